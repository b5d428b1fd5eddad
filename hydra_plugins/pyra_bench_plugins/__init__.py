"""pyra_bench's Hydra plugins. Hydra accepts plugin classes only from the ``hydra_plugins`` namespace
package, so these are thin subclasses; the logic lives in :mod:`pyra_bench.sweep` and
:mod:`pyra_bench.launcher`."""

from pyra_bench import launcher, sweep


class DedupSweeper(sweep.DedupSweeper):
    """See :class:`pyra_bench.sweep.DedupSweeper`."""


class LocalGPULauncher(launcher.LocalGPULauncher):
    """See :class:`pyra_bench.launcher.LocalGPULauncher`."""
