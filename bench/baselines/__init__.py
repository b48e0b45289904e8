"""The peers sessionmgr is measured against, on the same Redis, server and machine."""

import gc


def freeze_after_startup() -> None:
    """What sessionmgr does once it is up (SESSIONMGR_GC_FREEZE): the baselines get it too,
    so that no ratio comes from a process-level setting one side has and the other lacks."""
    gc.collect()
    gc.freeze()
