"""The bottom layer every command shares: the run folder, where its study is stored, and how
to read the study. Nothing here trains, measures or searches."""

from slimsearch.run.folder import RunFolder
from slimsearch.run.storage import open_storage
from slimsearch.run.study import (
    OBJECTIVES,
    better_in,
    decidedly_better,
    load_study,
    strictly_better,
    undecided,
)

__all__ = ["OBJECTIVES", "better_in", "decidedly_better", "RunFolder", "load_study", "open_storage",
           "strictly_better", "undecided"]
