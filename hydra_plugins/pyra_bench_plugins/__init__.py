"""pyra_bench's Hydra plugins. Hydra accepts plugin classes only from the ``hydra_plugins`` namespace
package, so these are thin subclasses; the logic lives in :mod:`pyra_bench.sweep` and
:mod:`pyra_bench.launcher`. (Hydra imports this module in every Hydra app: it must never fail.)"""

try:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # as the scan has just (re)made it

    from pyra_bench import launcher, sweep

    class DedupSweeper(sweep.DedupSweeperMixin, BasicSweeper):
        """See :class:`pyra_bench.sweep.DedupSweeperMixin`."""

    class LocalGPULauncher(launcher.LocalGPULauncher):
        """See :class:`pyra_bench.launcher.LocalGPULauncher`."""

except (ImportError, AttributeError):  # another pyra_bench (e.g. an older checkout) on the path
    pass
