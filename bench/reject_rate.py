"""Which `reject_rate` keeps real digits refused "not sure" within 0.5% on digits the threshold never saw.

The threshold is fitted on the validation digits (MNIST's, photographed and drawn: each view refused at most
`reject_rate`), and the issue's budget is 0.5% of digits it never saw. Fitted at exactly 0.5%, a new set of digits is
refused more than that about half the time: the threshold is an estimate. This measures the margin on validation
digits only: each view is cut in two halves at random, the threshold fitted on one half and measured on the other
(both ways, 20 cuts), for each candidate rate and each model; with the share of tune-family non-digits it answers
"not sure". The test families and the test digits play no part.

    python bench/reject_rate.py --model ../training_results/<run>/best.pt [--model ...]   # calibrated models

The rule that chose `[train] reject_rate`: the largest candidate whose held-out halves are refused at most 0.5% on
average, in the worst view, for every model. The table goes to bench/results/reject_rate.json and .md.
"""
import argparse
import numpy as np
from results import save
from digit_recognition.data import load_cleaned
from digit_recognition.views import load_views
from digit_recognition.outliers import build_outliers
from digit_recognition.calibration import probabilities_from_checkpoint, top_probability, reject_threshold

RATES, BUDGET, CUTS = (0.003, 0.004, 0.005), 0.005, 20
COLS = ['model', 'reject_rate', 'held-out half refused (worst view, mean)', 'cuts over 0.5%',
        'tune non-digits not sure']


def held_out(conf:dict, out:np.ndarray, rate:float, rng) -> tuple:
    "`(worst view's refused share of each held-out half, tune non-digits not sure at each threshold)` over the cuts."
    worst, nd = [], []
    for _ in range(CUTS):
        half = {k: rng.permutation(len(c)) < len(c)//2 for k, c in conf.items()}
        for side in (True, False):
            t = min(reject_threshold(c[half[k] == side], rate) for k, c in conf.items())
            worst.append(max(float((c[half[k] != side] < t).mean()) for k, c in conf.items()))
            nd.append(float((out < t).mean()))
    return np.array(worst), np.array(nd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', action='append', required=True, help="a calibrated best.pt (repeatable)")
    a = ap.parse_args()
    data = load_cleaned()
    v = load_views(data)
    views = {'val': data.val[0].squeeze(1).numpy(), 'val_photo': v['val_photo'], 'val_drawn': v['val_drawn']}
    tune = build_outliers('tune', 3000, seed=11, digits=data.train[0].squeeze(1).numpy(), quiet=True)['images']
    rows, figs = [], {}
    for m in a.model:
        net, rng = probabilities_from_checkpoint(m), np.random.default_rng(0)
        conf = {k: top_probability(net, x) for k, x in views.items()}
        out = top_probability(net, tune)
        for r in RATES:
            w, nd = held_out(conf, out, r, rng)
            rows.append((m.split('/')[-2][:8], r, f"{w.mean():.2%}", f"{(w > BUDGET).mean():.0%}", f"{nd.mean():.1%}"))
            figs.setdefault(str(r), []).append(float(w.mean()))
            print(rows[-1], flush=True)
    ok = [r for r in RATES if max(figs[str(r)]) <= BUDGET]
    chosen = max(ok) if ok else min(RATES)
    notes = [f"Models: {', '.join(a.model)} (calibrated; their own thresholds are not used). Views: the validation "
             f"split's {len(views['val']):,} digits as MNIST has them, photographed and drawn; {CUTS} random cuts in "
             f"halves, each half fitting the threshold for the other; tune non-digits: {len(tune):,} (seed 11).",
             f"Chosen: reject_rate {chosen} (the largest rate whose held-out halves are refused at most 0.5% on "
             "average in the worst view, for every model)."]
    save('reject_rate', rows, COLS, notes, {'chosen': chosen, 'held_out_mean': figs})


if __name__ == '__main__':
    main()
