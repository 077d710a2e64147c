"""Test-time augmentation (TTA) for "not a digit": does averaging the answers to a few shifted copies of an image
separate digits from non-digits better than one forward pass, and what does it cost?

Which images do what (the test families and MNIST's test split play no part here):
  validation  MNIST's validation digits, photographed and drawn (`views.load_views`): the temperature (fitted on
              the plain logits, as training does), the accuracies, and each variant's own threshold, the highest that
              refuses at most 0.4% of each view (the default reject_rate, as training fits it).
  tune        `outliers.families('tune')` non-digits (seed 11, as bench/recipes.py): the share answered "not sure".

Variants: the shifted copies (in pixels, torch.roll on the 28x28 image) and how they are combined: the mean of the
calibrated probabilities ('probs'), or softmax of the mean logits ('logits'). The cost column is inference images
per second on this CPU relative to one pass.

    python bench/tta.py --model training_results/<run id>/best.pt
    python bench/tta.py                 # trains the default recipe first (minutes)

The table goes to bench/results/tta.json and .md.
"""
import argparse, tempfile, time
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from digit_recognition.data import load_cleaned
from digit_recognition.outliers import build_outliers
from digit_recognition.views import load_views
from digit_recognition.training import TrainParams, model_from_checkpoint, load_checkpoint
from digit_recognition.calibration import predict_logits, fit_temperature, reject_threshold
from results import save, table
from trained import MODEL_HELP, checkpoint

CROSS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
VARIANTS = {'none (one pass, as today)': ([(0, 0)], 'probs'),
            '1 px cross, mean probabilities': (CROSS, 'probs'),
            '1 px cross, mean logits': (CROSS, 'logits'),
            '1 px square (9), mean probabilities': ([(a, b) for a in (0, 1, -1) for b in (0, 1, -1)], 'probs'),
            '2 px cross, mean logits': ([(2*a, 2*b) for a, b in CROSS], 'logits')}
RATE = 0.004
COLS = ['variant', 'passes', 'val acc', 'val photographed acc', 'val drawn acc', 'threshold',
        'tune non-digits not sure', 'tune AUROC', 'images/s (relative)']


def shifted(x:np.ndarray, dx:int, dy:int) -> torch.Tensor:
    "uint8 images N x 28 x 28 moved `dx` right and `dy` down (wrapping round: the borders are blank), N x 1 x 28 x 28."
    t = torch.from_numpy(x)
    return (torch.roll(t, (dy, dx), (1, 2)) if dx or dy else t).unsqueeze(1).contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='', help=MODEL_HELP)
    ap.add_argument('--tune', type=int, default=3000, help="tune-family non-digits to make (default: %(default)s)")
    a = ap.parse_args()
    data = load_cleaned()
    views = load_views(data)
    with tempfile.TemporaryDirectory() as d:
        state = load_checkpoint(checkpoint(a.model, data, d))
        net = model_from_checkpoint({**state, 'params': {**state['params'], 'tta': False}})   # one pass: shifts here
    knobs, default = state['params'], vars(TrainParams(device='cpu'))
    changed = {k: v for k, v in knobs.items() if default.get(k) != v and k != 'device'}
    what = (f"a {knobs['model']} of width {knobs['width']}, {knobs['epochs']} epochs, seed {knobs['seed']}, dataset "
            f"{state['dataset_version']}: " + (f"the default recipe but {changed}" if changed else
                                                "the default recipe (settings.ini [train])"))
    tune = build_outliers('tune', a.tune, seed=11, digits=data.train[0].squeeze(1).numpy(), quiet=True)['images']
    sets = {'val': data.val[0].squeeze(1).numpy(), 'val_photo': views['val_photo'], 'val_drawn': views['val_drawn'],
            'tune': tune}
    labels = {'val': data.val[1].numpy(), 'val_photo': views['labels'], 'val_drawn': views['labels']}
    shifts = sorted({s for v, _ in VARIANTS.values() for s in v})
    z = {k: {s: predict_logits(net, shifted(x, *s)) for s in shifts} for k, x in sets.items()}
    t0 = time.perf_counter(); predict_logits(net, shifted(sets['val'], 0, 0)); one = time.perf_counter() - t0
    T = fit_temperature(z['val'][(0, 0)], torch.as_tensor(labels['val']))
    rows, figs = [], {}
    for name, (sh, mode) in VARIANTS.items():
        def probs(k):
            zs = torch.stack([z[k][s] for s in sh])
            return torch.softmax(zs.mean(0)/T, 1) if mode == 'logits' else torch.softmax(zs/T, 2).mean(0)
        P = {k: probs(k) for k in sets}
        conf = {k: P[k].max(1).values.numpy() for k in sets}
        th = min(reject_threshold(conf[k], RATE) for k in labels)
        acc = {k: float((P[k].argmax(1).numpy() == labels[k]).mean()) for k in labels}
        dig = np.concatenate([conf[k] for k in labels])
        auc = float(roc_auc_score(np.r_[np.ones(len(dig)), np.zeros(len(tune))], np.r_[dig, conf['tune']]))
        unsure = float((conf['tune'] < th).mean())
        rows.append((name, len(sh), f"{acc['val']:.4f}", f"{acc['val_photo']:.4f}", f"{acc['val_drawn']:.4f}",
                     f"{th:.3f}", f"{unsure:.1%}", f"{auc:.4f}", f"1/{len(sh)}"))
        figs[name] = dict(passes=len(sh), **{f'{k}_accuracy': round(v, 4) for k, v in acc.items()},
                          threshold=round(th, 4), tune_not_sure=round(unsure, 4), tune_auroc=round(auc, 4))
    notes = [f"model: {what}; temperature {T:.4f} (plain logits of the "
             f"validation split); {len(tune):,} tune-family non-digits reach the model; thresholds refuse at most "
             f"{RATE:.1%} of each validation view. One pass over the 5,000 validation digits: {one:.2f} s here.",
             "A variant with n passes costs n forward passes wherever the model answers, and also where the threshold "
             "is fitted (every training run: its three validation views)."]
    print(table(COLS, rows)); print(); print('\n\n'.join(notes))
    save('tta', rows, COLS, notes, figs)


if __name__ == '__main__':
    main()
