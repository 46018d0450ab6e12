import pytest

from cilearn.config import RunConfig, from_dict


def quick_config(tmp_path, **over) -> RunConfig:
    """A small digits run: the embedded data set, few epochs, no progress bars."""
    d = {"method": "icarl", "out": str(tmp_path / "run"),
         "data": {"dataset": "digits"}, "scenario": {"base": 0, "increment": 2},
         "train": {"epochs": 6, "progress": False}}
    for k, v in over.items():
        sect, _, key = k.partition("__")
        if key:
            d.setdefault(sect, {})[key] = v
        else:
            d[sect] = v
    return from_dict(RunConfig, d)


@pytest.fixture
def quick(tmp_path):
    return lambda **over: quick_config(tmp_path, **over)
