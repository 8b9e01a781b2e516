"""Fill a store with replayed tuning runs, to look at ``torchtune-ops dashboard`` without a GPU.

    python scripts/demo_history.py /tmp/demo-cache            # then:
    torchtune-ops --cache-dir /tmp/demo-cache dashboard

Each space of ../shared/datasets given (default: three) is searched by ``search.tune`` over its recorded
GPU timings (the replay rules of benchmarks/search_efficiency.py) and stored as one tuned problem of a
device named after the GPU, ``|replayed`` appended to its fingerprint. docs/dashboard.png was taken from it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
from replay import load_space  # noqa: E402

DATASETS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "datasets"))
SPACES = {"convolution_kt/RTX_3090": "NVIDIA GeForce RTX 3090", "convolution_kt/RTX_Titan": "NVIDIA TITAN RTX",
          "dedispersion_milo/W6600": "AMD Radeon PRO W6600"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache_dir", help="the cache directory to write tuning.sqlite into")
    p.add_argument("--datasets", default=DATASETS)
    p.add_argument("--trials", type=int, default=120)
    a = p.parse_args(argv)

    from torchtune_ops.search import Space, tune
    from torchtune_ops.storage.store import Entry, Store, problem_key

    store = Store.open(os.path.join(a.cache_dir, "tuning.sqlite"))
    for name, gpu in SPACES.items():
        space = load_space(os.path.join(a.datasets, name + ".json.gz"), name=name)
        r = tune(Space(space.params), space.time_of, candidates=space.configs(), max_trials=a.trials, seed=0)
        family = name.split("/")[0]
        entry = Entry(f"{gpu}|replayed", family, problem_key({"space": name}),
                      json.dumps(r.best_config, sort_keys=True), r.best_value, r.best_value, len(r.trials))
        store.put(entry, trials=r.trials, policy="replace")
        print(f"{name}: {len(r.trials)} trials, best {r.best_value:.4g} ms (optimum {space.optimum:.4g} ms)")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
