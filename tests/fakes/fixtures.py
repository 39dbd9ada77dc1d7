"""pytest fixture for the fake NVML. Import it into a test module:

    from tests.fakes.fixtures import fake_gpus  # noqa: F401  (pytest finds the fixture by name)

    def test_page(fake_gpus):
        fake_gpus.set(fake.scenario(n_gpus=8))          # this process and any child it starts
        fake_gpus.set(n_gpus=1, overrides={0: {"memory_used": 79 * fake.GiB}})

The scenario goes to a JSON file named by SAE_LAB_FAKE_GPUS and SAE_LAB_NVML_MODULE points at the
fake, so child processes (daemon, streamlit, benches) started with the test's environment see the same
GPUs; `fake_gpus.env` holds both variables for a `subprocess_env(**fake_gpus.env)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sae_core.gpu import nvml
from tests.fakes import fake_pynvml as fake


class FakeGpus:
    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch):
        self.path = path
        self.env = fake.env_for(path)  # for child processes: the fake by its file path
        monkeypatch.setenv(fake.SCENARIO_ENV, str(path))
        monkeypatch.setenv("SAE_LAB_NVML_MODULE", fake.MODULE_NAME)  # this process: the module `fake` itself

    def set(self, scn: dict | None = None, **kwargs: Any) -> dict:
        """Use `scn` (or `fake.scenario(**kwargs)`) from now on, here and in processes started later."""
        data = scn if scn is not None else fake.scenario(**kwargs)
        fake.write_scenario(self.path, data)
        fake.reset()  # re-read the file, forget nvmlInit
        nvml.reset()  # the next probe initialises NVML again with the new scenario
        return data


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch) -> FakeGpus:
    """Fake NVML with, by default, no GPU at all but a working driver; call `.set(...)` to change it."""
    controller = FakeGpus(tmp_path / "fake_gpus.json", monkeypatch)
    controller.set(fake.scenario(n_gpus=0))
    yield controller
    fake.reset()
    nvml.reset()
