import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never reach the Hub: a name that is not cached fails at once instead of after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Helpers that live beside the tests (the loopback Hub) import as plain modules, and the repository root's
# `benchmarks` (check_syncs.py) whatever the working directory.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A private feature cache for the session: the digits classifier is trained once into it."""
    path = tmp_path_factory.getbasetemp() / "ddpm-paper-cache"
    saved = os.environ.get("DDPM_PAPER_CACHE")
    os.environ["DDPM_PAPER_CACHE"] = str(path)
    from evaluation import DigitsFeatures

    DigitsFeatures.pretrained()
    yield path
    if saved is None:
        os.environ.pop("DDPM_PAPER_CACHE", None)
    else:
        os.environ["DDPM_PAPER_CACHE"] = saved


@pytest.fixture
def connections(monkeypatch) -> list:
    """The addresses of the network connections the test attempts (each still made): a test of an offline failure
    asserts there are none, which is what makes it fail at once rather than after the Hub client's retries."""
    attempts = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def recorded(method):
        def attempt(self, address):
            attempts.append(address)
            return method(self, address)

        return attempt

    monkeypatch.setattr(socket.socket, "connect", recorded(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", recorded(connect_ex))
    return attempts


# Tests in a fresh process -------------------------------------------------------------------------------------------
# `accelerate` keeps one process-wide state (devices, mixed precision, the process group) that an `Accelerator` creates
# and nothing public resets. A test marked `fresh_process` never runs in the pytest process: all the selected marked
# tests run together in one new pytest process, and their reports come back here through pytest's report hooks. The
# pytest process itself never holds accelerate state. One process for all (not one per module, as before) because the
# imports cost about 8 s a process and the tests themselves under a second each; they can share it because every
# Accelerator they build has one configuration (CPU, no mixed precision). A test that needs another runs the script in
# a subprocess, as the launcher tests do.
FRESH_PROCESS_REPORTS = "DDPM_TESTS_FRESH_PROCESS_REPORTS"  # set in the child: where it writes its reports
FRESH_PROCESS_TIMEOUT = 900  # a safety net only: all of them (slow ones too) take about 50 s


_fresh_reports_key = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_fresh_reports_key] = {}
    if _in_child():
        config.pluginmanager.register(
            _ReportWriter(config, os.environ[FRESH_PROCESS_REPORTS]), "fresh-process-reports"
        )


def _in_child() -> bool:
    return FRESH_PROCESS_REPORTS in os.environ


def _run_group_in_fresh_process(item: pytest.Item) -> dict[str, list]:
    """Run the session's selected `fresh_process` tests in one new pytest process; their reports by nodeid."""
    group = [i.nodeid for i in item.session.items if i.get_closest_marker("fresh_process")]
    folder = Path(tempfile.mkdtemp(prefix="ddpm-fresh-process-"))
    reports_file = folder / "reports.jsonl"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(folder / "tmp")]
    command += ["-o", "addopts=", *group]
    env = {**os.environ, FRESH_PROCESS_REPORTS: str(reports_file)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=FRESH_PROCESS_TIMEOUT)
    reports: dict[str, list] = {nodeid: [] for nodeid in group}
    if reports_file.exists():
        for line in reports_file.read_text().splitlines():
            report = item.config.hook.pytest_report_from_serializable(config=item.config, data=json.loads(line))
            if isinstance(report.longrepr, list):  # a skip's (path, line, reason): JSON made the tuple a list
                report.longrepr = tuple(report.longrepr)
            reports.setdefault(report.nodeid, []).append(report)
    missing = [nodeid for nodeid, got in reports.items() if not got]
    if missing:  # the process died, or did not collect a test: say so on each test it did not report
        output = f"{command} exited {result.returncode}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        for nodeid in missing:
            reports[nodeid] = [pytest.TestReport(nodeid, item.location, {}, "failed", output, "call")]
    shutil.rmtree(folder, ignore_errors=True)
    return reports


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Each module's fresh-process tests first: no fixture of their module is set up here before them (pytest tears
    a module's fixtures down after its last test; a test that runs elsewhere sets up and tears down nothing here)."""
    if _in_child():
        return
    modules = {}
    for item in items:
        modules.setdefault(item.path, len(modules))
    items.sort(key=lambda item: (modules[item.path], item.get_closest_marker("fresh_process") is None))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if _in_child() or item.get_closest_marker("fresh_process") is None:
        return None
    cache = item.config.stash[_fresh_reports_key]
    if "all" not in cache:
        cache["all"] = _run_group_in_fresh_process(item)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in cache["all"][item.nodeid]:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


class _ReportWriter:
    """In the child: every report of every phase, one JSON line each, for the pytest process to replay."""

    def __init__(self, config, path: str):
        self.config, self.path = config, path

    def pytest_runtest_logreport(self, report):
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        with open(self.path, "a") as file:
            file.write(json.dumps(data) + "\n")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """A real tmpfs of the size and options asked, mounted under tmp_path and unmounted at the end (skipped where
    not allowed)."""
    mounted = []

    def mount(kilobytes: int, options: str = "") -> Path:
        folder = tmp_path / f"disk-{kilobytes}k{options.replace(',', '-')}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k{options}", "tmpfs", str(folder)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
