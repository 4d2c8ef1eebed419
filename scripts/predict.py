"""Generate from a predict YAML on every rank of an msrun job (see scripts/run_predict.sh).

Every rank runs the same steps (the collectives need all of them); rank 0 prints the result.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="predict YAML (parallel_config sets the layout)")
    p.add_argument("--prompt-ids", default="0,17,234", help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=20)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import numpy as np

    import deepseek_ms
    model = deepseek_ms.load_model(args.config, progress=False)
    ids = np.array([[int(t) for t in args.prompt_ids.split(",")]], dtype=np.int64)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens)
    if model.layout.rank == 0:
        print("PREDICT ids: " + ",".join(str(int(t)) for t in out[0]), flush=True)


if __name__ == "__main__":
    main()
