"""A method defined outside pyra_bench, written as the README's "Adding a method" template says: ToMe-style
merging that protects the class and distillation tokens the build context reports. Registered by its
config's ``_target_`` (``tests/plugins/conf/method/mymethod.yaml``) or by an entry point; no edit inside
pyra_bench."""

from __future__ import annotations

from pyra_bench.methods import Method
from pyra_bench.models.merging import ToMeMerge
from pyra_bench.models.vit import set_token_reducers


class MyMethod(Method):
    display_name = "MyMethod"   # how tables and figures name it
    cost_factor = 0.8           # training cost per image relative to plain LoRA (GPU-hour estimates)

    def apply(self, model, ctx):
        super().apply(model, ctx)  # resolves and checks self.schedule from `compression`
        set_token_reducers(model, [ToMeMerge(r, ctx.num_protected) if r else None
                                   for r in self.schedule])


class EntryPointMethod(MyMethod):
    """The same method, registered through an entry point (tests/test_plugin.py)."""

    display_name = "EntryPointMethod"
