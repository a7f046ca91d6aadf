"""The controller: what turns one-shot `apply` into `reconciler run`.

Level-triggered (architecture.md, "The one idea"): every trigger - a file event, the
resync timer, a signal - only enqueues a *key*; a worker takes keys off the queue and
runs a reconcile that re-reads everything (manifests, state file, kernel). Nothing is
ever passed down from the trigger, so a lost, duplicated or reordered trigger can cost
a reconcile, never a wrong result.

- `queue`: the work queue (dedup, one in flight per key, delayed requeue, backoff);
- `debounce`: collapses a burst of file events into one batch after a quiet period;
- `watcher`: inotify on the manifests directory, feeding the debouncer;
- `exits`: pidfds of every recorded process, so that an exit is a trigger;
- `triggers`: the one thread that waits on all of the above and on the timers;
- `loop`: the `Controller` that wires triggers -> queue -> reconcile -> state file.
"""
