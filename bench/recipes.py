"""The recipe's knobs for "not a digit", chosen on the tune families only: what each costs in time and in digits.

Each recipe trains the default CNN with `training.fit` on the full cleaned training split (one seed), is calibrated
and gets its threshold as a training run does (`training.calibrate_checkpoint` on the validation split and its
photographed and drawn views), and is measured on:
  tune families  `outliers.families('tune')` non-digits, made here (the test families are never looked at here:
                 `bench/unsure.py` reports them, for the recipe chosen)
  digits         the validation split's photographed and drawn views (`views.load_views`), and MNIST's test split
                 (accuracy only: the issue's target is on it)
and prints training seconds, accuracies, the share of tune non-digits answered "not sure" at the threshold and the
AUROC of the calibrated top probability there.

    python bench/recipes.py                                # every recipe below (about 25 minutes on 2 cores)
    python bench/recipes.py --recipes default,digits-only  # some of them
    python bench/recipes.py --quick                        # smoke run: 2 epochs on 5,000 images, 400 non-digits

The table, with date, machine and versions, goes to bench/results/recipes.json and .md (--quick: recipes-quick.*).
"""
import argparse, tempfile, time
from dataclasses import replace
from pathlib import Path
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from digit_recognition.config import seed_everything
from digit_recognition.data import load_cleaned
from digit_recognition.model import get_model
from digit_recognition.outliers import build_outliers
from digit_recognition.views import load_views
from digit_recognition.training import TrainParams, fit, evaluate, model_from_checkpoint
from digit_recognition.calibration import calibrate_checkpoint, probabilities_from_checkpoint, top_probability
from results import save, table

RECIPES = {   # name: TrainParams changes from the package's defaults ([train])
    'default': {},
    'digits-only, 20 epochs (the earlier default)': dict(outlier_share=0, ema=0, epochs=20),
    'weight 0.25': dict(outlier_weight=0.25),
    'share 0.125, weight 1': dict(outlier_share=0.125, outlier_weight=1.0),
    'no EMA': dict(ema=0),
    '20 epochs': dict(epochs=20),
}


def measure(name, changes, data, views, tune, quick):
    "Train one recipe, calibrate it as a run does, measure it: a table row and its figures."
    p = replace(TrainParams(device='cpu'), **{**changes, **(dict(epochs=2, max_train_samples=5000) if quick else {})})
    seed_everything(p.seed)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time(); st = fit(get_model(p.model), data, d, p); secs = time.time() - t0
        cal = calibrate_checkpoint(Path(d)/'best.pt', *data.val, reject_rate=p.reject_rate,
                                   views={k: views[k] for k in ('val_photo', 'val_drawn')})
        net = probabilities_from_checkpoint(Path(d)/'best.pt')
        test = evaluate(model_from_checkpoint(Path(d)/'best.pt'), *data.test)['accuracy']
    th = cal['reject_threshold']
    with torch.no_grad():
        acc = {k: float((net(torch.from_numpy(views[k]).float()/255).argmax(1).numpy() == views['labels']).mean())
               for k in ('val_photo', 'val_drawn')}
    dig = np.concatenate([top_probability(net, views[k]) for k in ('val_photo', 'val_drawn')]
                         + [top_probability(net, data.val[0])])
    out = top_probability(net, tune)
    auc = roc_auc_score(np.r_[np.ones(len(dig)), np.zeros(len(out))], np.r_[dig, out])
    f = dict(changes=changes, epochs=p.epochs, train_seconds=round(secs, 1), best_epoch=st['best_epoch'],
             test_accuracy=test, val_photo_accuracy=round(acc['val_photo'], 4),
             val_drawn_accuracy=round(acc['val_drawn'], 4), threshold=round(th, 4),
             tune_not_sure=round(float((out < th).mean()), 4), tune_auroc=round(float(auc), 4))
    row = (name, p.epochs, f"{secs:.0f}", f"{test:.4f}", f"{acc['val_photo']:.4f}", f"{acc['val_drawn']:.4f}",
           f"{th:.3f}", f"{f['tune_not_sure']:.1%}", f"{auc:.4f}")
    print(table(COLS, [row]).splitlines()[-1], flush=True)
    return row, f


COLS = ['recipe', 'epochs', 'training s', 'MNIST test acc', 'val photographed acc', 'val drawn acc', 'threshold',
        'tune non-digits not sure', 'tune AUROC']


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--recipes', default=None, help=f"comma-separated, of: {', '.join(RECIPES)} (default: all)")
    ap.add_argument('--tune', type=int, default=3000, help="tune-family non-digits to make (default: %(default)s)")
    ap.add_argument('--quick', action='store_true', help="smoke run, written to bench/results/recipes-quick.*")
    a = ap.parse_args()
    names = a.recipes.split(',') if a.recipes else list(RECIPES)
    data = load_cleaned()
    views = load_views(data)
    tune = build_outliers('tune', 400 if a.quick else a.tune, seed=11, digits=data.train[0].squeeze(1).numpy(),
                          quiet=True)['images']
    print(table(COLS, []))
    rows, figs = [], {}
    for n in names:
        row, figs[n] = measure(n, RECIPES[n], data, views, tune, a.quick); rows.append(row)
    on = '5,000 training images, 2 epochs' if a.quick else 'the full training split'
    notes = [f"One seed ({TrainParams().seed}) per recipe, on {on}; "
             f"{len(tune):,} tune-family non-digits (seed 11) reach the model (the ink rules answer the others); the "
             "threshold of each is its own, fitted on the validation split and its photographed and drawn views "
             "(reject_rate of the recipe). The test families play no part here.",
             "The default recipe is settings.ini [train]: " + ', '.join(f"{k} {v}" for k, v in
                                                                         vars(TrainParams()).items()
                                                                         if k in ('epochs', 'outlier_share',
                                                                                  'outlier_weight', 'ema',
                                                                                  'reject_rate'))]
    save('recipes-quick' if a.quick else 'recipes', rows, COLS, notes, figs)


if __name__ == '__main__':
    main()
