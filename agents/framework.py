"""What nudgeflow changes in Faust, in one place: the state table is restored by nudgeflow.

Faust keeps the consumer group, partition assignment and the RocksDB store's lifecycle; its
changelog recovery would replay the state table one record at a time through its consumer and
stream machinery (~5,000 records/s). nudgeflow restores each assigned partition itself, in bulk,
once Faust has opened its store (`agents.restore`), so this Recovery never reads a changelog:
Faust goes straight from assignment to "recovered", and the pipeline restores before it uses a
partition. Standby replicas are off for the same reason (they would read through Faust's path).
"""

from __future__ import annotations

import faust
from faust.tables.recovery import Recovery as FaustRecovery


class Recovery(FaustRecovery):
    def need_recovery(self) -> bool:
        return False  # the pipeline restores the state table in bulk (agents.restore)


class TableManager(faust.tables.TableManager):
    @property
    def recovery(self) -> FaustRecovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
