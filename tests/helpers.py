"""Shared test utilities: fixture paths and a per-session cache of loaded models
(building and compiling a model costs seconds, so each fixture is loaded once)."""
import functools
import pathlib

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def fixture_dir(name: str) -> pathlib.Path:
    return FIXTURES / name


@functools.lru_cache(maxsize=None)
def load_fixture_model(name: str):
    import deepseek_ms
    return deepseek_ms.load_model(str(fixture_dir(name)), progress=False)
