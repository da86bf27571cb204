"""The controller's frontend watchdog (a part of Controller, packrat/serving/controller.py): a
TorchServe that Packrat started and that died is restarted and every plan served again; an
attached one that stops answering is reported and waited for, and the plans it lost are
served again once it answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from packrat.core.decide import Reason, SwitchTo
from packrat.core.policy import plan_for_batch
from packrat.errors import PackratError, PlanError
from packrat.torchserve import is_running, stop_server

log = logging.getLogger(__name__)


class Watchdog:
    """Controller's methods for a dead TorchServe; they use the controller's state (server,
    switches, models, standby) and its start_switch, _finished and save_state."""

    def server_up(self) -> bool:
        """True if TorchServe runs. A frontend that died (killed, out of memory) takes its
        workers with it; restart it with the same settings and serve every model's plan
        again, as a new version (the old one's files and slots are stale). The restart itself
        blocks (nothing can be served meanwhile); the switches that follow do not."""
        if self.attached:
            return self._attached_up()
        if self.server is None or self.restart_server is None or is_running(self.server):
            return True
        if self.clock() < self.server_retry_at:
            return False
        dead = self.server.frontend_pid
        self.server_event = (f"TorchServe frontend (pid {dead}) exited at {_hms(self.wall())}; "
                             "restarting it")
        log.error("%s", self.server_event)
        self._abort_switches("TorchServe exited")
        self.save_state()
        try:
            stop_server(self.server)  # what is left of it: workers still holding slot locks
            self.server = self.restart_server()
        except PackratError as e:
            self.server_event = (f"TorchServe frontend (pid {dead}) exited and could not be "
                                 f"restarted: {e}; retrying in {self.params.retry_after_s:.0f} s")
            log.error("%s", self.server_event)
            self.server_retry_at = self.clock() + self.params.retry_after_s
            self.save_state()
            return False
        self.server_restarts += 1
        restoring = self._restore_all()
        self.server_event = (f"TorchServe frontend (pid {dead}) exited at {_hms(self.wall())}; "
                             f"restarted as pid {self.server.frontend_pid}, serving "
                             f"{', '.join(restoring) or 'nothing (see last_error)'} again")
        log.warning("%s", self.server_event)
        self.save_state()
        return True

    def _abort_switches(self, why: str) -> None:
        for switch in [*self.switches.values(), *self.prewarms.values(), *self.draining]:
            switch.abort(why)
            self._finished(switch)
        self.switches.clear()
        self.prewarms.clear()
        self.draining = []
        self.standby.lost()
        self.retiring = []

    def _restore_all(self, only_missing: bool = False) -> list[str]:
        """Serve every model's plan again as a new version (only_missing: only the models
        whose live version TorchServe no longer has); what was restored, described."""
        restoring = []
        for m in self.models.values():
            if only_missing and m.plan is not None and any(
                    v.version == m.plan.version for v in self.client.versions(m.name)):
                continue
            # The old version died with the frontend; the switch finds it gone and removes
            # its files. Until the new one serves, status shows the old plan without pids.
            old = m.plan
            if old is not None:
                plan = replace(old, version=str(m.next_version))
            else:
                try:
                    plan = plan_for_batch(m.optimizer, m.name, str(m.next_version),
                                          m.estimator.estimate, m.cores)
                except PlanError as e:
                    m.last_error = str(e)
                    continue
            self.start_switch(SwitchTo(plan, Reason.RESTORE))
            restoring.append(f"{m.name} {plan.describe()}")
        return restoring

    def _attached_up(self) -> bool:
        """The user's TorchServe answers /ping (looked at once per interval). One that stops
        answering is reported and waited for: Packrat never restarts a TorchServe it did not
        start. Once it answers again, models whose version it lost (it was restarted) are
        served again as new versions."""
        now = self.clock()
        if now < self.server_retry_at:
            return self.down_since is None
        self.server_retry_at = now + self.params.interval_s
        try:
            alive = self.client.ping()
        except PackratError:  # e.g. its key file is gone with it
            alive = False
        if not alive:
            if self.down_since is None:
                self.down_since = self.wall()
                self.server_event = (f"the attached TorchServe stopped answering at "
                                     f"{_hms(self.down_since)}; waiting for it (Packrat does not "
                                     "restart a TorchServe it did not start)")
                log.error("%s", self.server_event)
                self._abort_switches("the attached TorchServe stopped answering")
                self.save_state()
            return False
        if self.down_since is not None:
            self.down_since = None
            try:
                restoring = self._restore_all(only_missing=True)
            except PackratError as e:  # it went away again: look at the next interval
                log.warning("the attached TorchServe answers again, but: %s", e)
                self.down_since = self.wall()
                return False
            self.server_event = (f"the attached TorchServe answers again since "
                                 f"{_hms(self.wall())}" + (f"; serving {', '.join(restoring)} "
                                                           "again" if restoring else ""))
            log.warning("%s", self.server_event)
            self.save_state()
        return True


def _hms(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))
