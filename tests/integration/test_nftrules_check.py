"""The rendered nftables text is accepted by the kernel (`nft -c`: check mode, commits nothing)."""

from __future__ import annotations

import subprocess

from reconciler.kernel.nftrules import Allow, IsolationSpec, render, script
from tests.unit.test_nftrules import spec


def test_rendered_text_passes_nft_check_mode() -> None:
    """`nft -c` parses and validates against the kernel without committing (root only)."""
    rich = spec(
        Allow(dst_env="b", src_env="a", ports=(8080,)),
        Allow(dst_env="c", src_cidr="10.9.0.0/28", protocol="udp"),
        Allow(dst_env="a", src_env="b"),
        quarantined=frozenset({"c"}),
    )
    for candidate in (rich, spec(), IsolationSpec(instance="demo")):
        text = script(render(candidate), {})
        result = subprocess.run(
            ["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{result.stderr}\n--- script\n{text}"
