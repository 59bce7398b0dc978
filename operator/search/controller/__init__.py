"""The search loop: Optuna asks, spaces build plans, executors run them, Hyperband promotes or prunes.

It knows nothing of Kubernetes. `reconcile()` is level-based and idempotent: it reads the study and the
executor's runs, moves every trial one step towards done, launches new work up to `parallelTrials`, and
returns the status. Call it again and again (a loop locally, a timer and pod events on a cluster); after
a crash, a new controller on the same study and executor carries on, because every fact it acts on is
stored before it acts:

1. a finished run's counts are stored on its trial (`result.r<k>`) with the decision they lead to
   (`decision.r<k>`: promote, complete, prune or stop) and, unless promoted, the trial's end; then the
   run is released and a promotion starts the next rung's run (idempotent by its deterministic name).
   A decision found stored but not acted on is acted on again (telling Optuna is idempotent with
   skip_if_finished);
2. a failed run is stored (`failures.r<k>`) and retried under a new name (`-a<n>`) while retries last.

So no run is started twice and no counted sample is evaluated again. Trial runs write nothing to the
study: the controller alone tells Optuna. A reconcile stores what it learns and decides (results,
decisions, new trials) in one database transaction and only then acts on runs (`acts`): with many
trials in flight, one transaction per reconcile instead of a few per trial. After each reconcile it
sweeps: every run the executor holds that the study does not say is live is let go.

One job a file: `loop` (the controller), `trials` (a trial's stored facts), `acts` (store, then act),
`final` (the held-out stage), `status` (what the search looks like).
"""

from .final import FinalStage
from .loop import MAX_SKIPS_IN_A_ROW, MAX_SKIPS_PER_RECONCILE, SearchController, SearchObserver
from .status import Best, SearchStatus
from .trials import TrialView, accuracies, decision_key, failures_key, result_key

__all__ = [
    "MAX_SKIPS_IN_A_ROW",
    "MAX_SKIPS_PER_RECONCILE",
    "Best",
    "FinalStage",
    "SearchController",
    "SearchObserver",
    "SearchStatus",
    "TrialView",
    "accuracies",
    "decision_key",
    "failures_key",
    "result_key",
]
