"""Task arithmetic on the embedded zoo with low-rank task-vector banks (``TaskVectorBank.low_rank``).

For the full bank and each rank / energy: α chosen on val over the usual grid by mean normalised accuracy
(normalised by the recorded fine-tuned accuracy), test reported at that α; ``stored`` is the share of the
dense bank's numbers the factorised bank keeps.

    .venv/bin/python benchmarks/low_rank_zoo.py --preset default --ranks 1,2,4,8,16,32 --energies 0.5,0.9
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vtvc_pyro.evaluate import evaluate_encoder, mean_normalized_accuracy, select_alpha  # noqa: E402
from vtvc_pyro.merge import task_arithmetic  # noqa: E402
from vtvc_pyro.zoo.store import Zoo, zoo_root  # noqa: E402


def stored_share(bank) -> float:
    """Numbers the factorised bank stores (factors + dense entries) over the dense bank's."""
    factored = {k: a.shape[1:].numel() + b.shape[1:].numel() for k, (a, b) in bank.factors.items()}
    return sum(factored.get(e.name, e.numel) for e in bank.entries) / bank.num_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--ranks", default="1,2,4,8,16,32")
    parser.add_argument("--energies", default="0.5,0.9")
    args = parser.parse_args()
    zoo = Zoo(zoo_root(args.preset))
    visual = zoo.create_model().visual.eval()
    splits = {s: {t: zoo.split(t, s) for t in zoo.task_names} for s in ("val", "test")}
    finetuned = {s: zoo.accuracy("finetuned", s) for s in splits}

    def score(state_dict, split):
        visual.load_state_dict(state_dict)
        return evaluate_encoder(lambda images, ids: visual(images), zoo.heads, splits[split], 500)

    full = zoo.bank()
    specs = [("full", {})] + [(f"rank {r}", {"rank": int(r)}) for r in args.ranks.split(",") if r] + [
        (f"energy {e}", {"energy": float(e)}) for e in args.energies.split(",") if e]
    print(f"{zoo}: T = {full.num_tasks}, P = {full.num_params}")
    print("| bank | stored | α | val mean norm. acc | test mean norm. acc | build s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, spec in specs:
        start = time.perf_counter()
        bank = full.low_rank(**spec)
        built = time.perf_counter() - start
        chosen = select_alpha(lambda a, bank=bank: score(task_arithmetic(bank, a), "val"), finetuned["val"])
        test = mean_normalized_accuracy(score(task_arithmetic(bank, chosen.alpha), "test"), finetuned["test"])
        print(f"| {label} | {stored_share(bank):.1%} | {chosen.alpha:.2f} | {100 * chosen.score:.1f} | "
              f"{100 * test:.1f} | {built:.1f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
