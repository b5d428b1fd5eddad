"""A Trainer class of one's own, named by ``trainer._target_`` in the factory tests: it takes one option the
Lightning Trainer does not (``tag``) and remembers it."""

from __future__ import annotations

import lightning as L


class TaggedTrainer(L.Trainer):
    def __init__(self, *args, tag: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag
