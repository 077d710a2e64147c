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

    python bench/recipes.py                                # every recipe below (about 40 minutes on 2 cores)
    python bench/recipes.py --recipe default --recipe 'width 24'   # some of them
    python bench/recipes.py --quick                        # smoke run: 2 epochs on 5,000 images, 400 non-digits

The table, with date, machine and versions, goes to bench/results/recipes.json and .md (--quick: recipes-quick.*).
Recipes measured now replace their earlier rows; the others are kept, each with the date and commit it was measured
at (column `measured`): rows from before a change of the defaults measured the defaults of then.
"""
import argparse, json, tempfile, time
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
from digit_recognition.training import TrainParams, fit, evaluate, model_from_checkpoint, forward_dtype
from digit_recognition.calibration import calibrate_checkpoint, probabilities_from_checkpoint, top_probability
from results import RESULTS, save, table

RECIPES = {   # name: TrainParams changes from the package's defaults ([train]); pool_first: the CNN's layout
    'default': {},
    'one pass (tta off, the default before)': dict(tta=False),
    'share 0.5': dict(outlier_share=0.5),
    'label_smoothing 0.05': dict(label_smoothing=0.05),
    'ink 0.75': dict(ink=0.75),
    'reject_rate 0.005': dict(reject_rate=0.005),
    'width 16, 14 epochs, BN before pooling (the default before)': dict(width=16, epochs=14, pool_first=False),
    'width 16, 14 epochs, BN before pooling, reject_rate 0.005': dict(width=16, epochs=14, pool_first=False,
                                                                      reject_rate=0.005),
    'ink 0 (the default before ink changes)': dict(ink=0),
    'ink 1 (every image changed)': dict(ink=1),
    'digits-only, 20 epochs (the earlier default)': dict(outlier_share=0, ema=0, epochs=20),
    'weight 0.25': dict(outlier_weight=0.25),
    'share 0.125, weight 1': dict(outlier_share=0.125, outlier_weight=1.0),
    'no EMA': dict(ema=0),
    '20 epochs': dict(epochs=20),
    'float32 (the default before bfloat16)': dict(precision='float32'),
    'width 32': dict(width=32),
    'width 24, 14 epochs, BN before pooling': dict(width=24, epochs=14, pool_first=False),
    'width 24, 11 epochs, BN before pooling': dict(width=24, epochs=11, pool_first=False),
}


def measure(name, changes, data, views, tune, quick):
    "Train one recipe, calibrate it as a run does, measure it: a table row and its figures."
    knobs = {k: v for k, v in changes.items() if k != 'pool_first'}
    p = replace(TrainParams(device='cpu'), **{**knobs, **(dict(epochs=2, max_train_samples=5000) if quick else {})})
    layout = {'pool_first': changes['pool_first']} if 'pool_first' in changes else {}
    seed_everything(p.seed)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time(); st = fit(get_model(p.model, width=p.width, **layout), data, d, p); secs = time.time() - t0
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
    f = dict(changes=changes, measured=MEASURED, epochs=p.epochs, train_seconds=round(secs, 1),
             best_epoch=st['best_epoch'],
             test_accuracy=test, val_photo_accuracy=round(acc['val_photo'], 4),
             val_drawn_accuracy=round(acc['val_drawn'], 4), threshold=round(th, 4),
             tune_not_sure=round(float((out < th).mean()), 4), tune_auroc=round(float(auc), 4))
    row = (name, MEASURED, p.epochs, f"{secs:.0f}", f"{test:.4f}", f"{acc['val_photo']:.4f}", f"{acc['val_drawn']:.4f}",
           f"{th:.3f}", f"{f['tune_not_sure']:.1%}", f"{auc:.4f}")
    print(table(COLS, [row]).splitlines()[-1], flush=True)
    return row, f


COLS = ['recipe', 'measured', 'epochs', 'training s', 'MNIST test acc', 'val photographed acc', 'val drawn acc',
        'threshold', 'tune non-digits not sure', 'tune AUROC']


MEASURED = f"{time.strftime('%Y-%m-%d')} {__import__('results').git_commit()[:7]}"


def earlier(name, names) -> tuple:
    "`({recipe: row}, {recipe: figures})` of the last run's file, but for the recipes `names` measured now."
    try: r = json.loads((RESULTS/f'{name}.json').read_text())
    except (OSError, ValueError): return {}, {}
    when = f"{r['date'][:10]} {r['versions']['git'][:7]}"                # rows of files from before `measured`
    rows = {x['recipe']: tuple(x.get(c, when if c == 'measured' else '') for c in COLS) for x in r['rows']
            if x['recipe'] in RECIPES and x['recipe'] not in names}
    return rows, {k: v for k, v in r['figures'].items() if k in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--recipe', action='append', choices=list(RECIPES), metavar='NAME',
                    help=f"a recipe to measure, repeatable; of: {'; '.join(RECIPES)} (default: all)")
    ap.add_argument('--tune', type=int, default=3000, help="tune-family non-digits to make (default: %(default)s)")
    ap.add_argument('--quick', action='store_true', help="smoke run, written to bench/results/recipes-quick.*")
    a = ap.parse_args()
    names = a.recipe or list(RECIPES)
    data = load_cleaned()
    views = load_views(data)
    tune = build_outliers('tune', 400 if a.quick else a.tune, seed=11, digits=data.train[0].squeeze(1).numpy(),
                          quiet=True)['images']
    print(table(COLS, []))
    rows, figs = earlier('recipes-quick' if a.quick else 'recipes', names)
    for n in names:
        row, figs[n] = measure(n, RECIPES[n], data, views, tune, a.quick); rows[n] = row
    rows = [rows[n] for n in RECIPES if n in rows]                     # in RECIPES' order
    on = '5,000 training images, 2 epochs' if a.quick else 'the full training split'
    notes = [f"One seed ({TrainParams().seed}) per recipe, on {on}, on this machine's CPU (precision auto: "
             f"{'bfloat16' if forward_dtype('auto', 'cpu') else 'float32'}); "
             f"{len(tune):,} tune-family non-digits (seed 11) reach the model (the ink rules answer the others); the "
             "threshold of each is its own, fitted on the validation split and its photographed and drawn views "
             "(reject_rate of the recipe). The test families play no part here. Rows measured before 2026-12-06 "
             "trained in float32, rows measured at 17e3e39 or before without ink changes (ink 0), rows measured at "
             "21b2dcc or before the CNN with batch norm before pooling, width 16, 14 epochs, rows measured before "
             "a24e2cb in one pass (no tta): the defaults then.",
             "The default recipe is settings.ini [train]: " + ', '.join(f"{k} {v}" for k, v in
                                                                         vars(TrainParams()).items()
                                                                         if k in ('width', 'epochs', 'precision', 'ink',
                                                                                  'outlier_share',
                                                                                  'outlier_weight', 'ema',
                                                                                  'reject_rate', 'tta'))]
    save('recipes-quick' if a.quick else 'recipes', rows, COLS, notes, figs)


if __name__ == '__main__':
    main()
