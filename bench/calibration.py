"""Calibration of a model trained with the default recipe: the temperature fitted on the validation split, and the
test ECE and accuracy before and after; with the ONNX export's agreement with PyTorch on the test split.

Takes a finished run's `best.pt` (no training here): by default the newest run under training_results/ whose
parameters are the default recipe's (settings.ini [train]; the device aside), or the one given:

    python bench/calibration.py                       # the newest default-recipe run
    python bench/calibration.py --run 0123...cdef     # a run id, a run folder or a best.pt

The table, with date, machine and versions, goes to bench/results/calibration.json and .md; its `figures` are what
the notebooks quote. The checkpoint is not changed (the calibration is fitted again from its logits).
"""
import argparse, tempfile
from dataclasses import asdict
from pathlib import Path
import torch
from digit_recognition.config import Settings
from digit_recognition.data import load_cleaned
from digit_recognition.model import export_onnx
from digit_recognition.training import TrainParams, load_checkpoint, model_from_checkpoint
from digit_recognition.calibration import calibrate, predict_logits, calibration, Probabilities
from digit_recognition.evaluation import onnx_agreement, predict_proba
from results import save, table

TARGET = 0.015   # the test ECE the issue asks of the calibrated default recipe


def default_run(results:Path) -> Path:
    "The newest `best.pt` under `results` trained with the default recipe (every parameter but the device)."
    want = {k: v for k, v in asdict(TrainParams.from_settings()).items() if k != 'device'}
    found = [p for p in results.glob('*/best.pt')
             if {k: v for k, v in load_checkpoint(p)['params'].items() if k != 'device'} == want]
    if not found: raise SystemExit(f"no run trained with the default recipe under {results}; train one (make train) "
                                   "or name one with --run")
    return max(found, key=lambda p: p.stat().st_mtime)


def ece_and_accuracy(logits, labels, t:float=1.0):
    p = torch.softmax(logits/t, dim=1)
    right = (p.argmax(1) == labels).numpy()
    return calibration(p.max(1).values.numpy(), right)[0], float(right.mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--run', default='',
                    help="a run id, run folder or best.pt (default: the newest default-recipe run)")
    a = ap.parse_args()
    results = Settings().path('paths', 'results_dir')
    ck_path = Path(a.run) if a.run and Path(a.run).exists() else (results/a.run if a.run else default_run(results))
    if ck_path.is_dir(): ck_path = ck_path/'best.pt'
    ck = load_checkpoint(ck_path)
    net = model_from_checkpoint(ck)
    data = load_cleaned(splits=('val', 'test'))
    if ck.get('dataset_version') not in (None, data.version):
        raise SystemExit(f"{ck_path} was trained on dataset {ck['dataset_version']}, "
                         f"the cleaned data is {data.version}")
    cal = calibrate(net, *data.val)                         # what training does after `fit`
    t = cal['temperature']
    z, y = predict_logits(net, data.test[0]), data.test[1]
    (ece0, acc0), (ece1, acc1) = ece_and_accuracy(z, y), ece_and_accuracy(z, y, t)
    prob = Probabilities(net, t).eval()
    with tempfile.TemporaryDirectory() as d:
        agree = onnx_agreement(export_onnx(prob, Path(d)/'model.onnx'), prob, data.test[0],
                               probs=predict_proba(prob, data.test[0]))
    p = ck['params']
    recipe = (f"{p['model']}, {p['epochs']} epochs, label smoothing {p['label_smoothing']}, "
              f"augment {p['augment']}, {'all' if not p['max_train_samples'] else p['max_train_samples']} images")
    rows = [['validation', len(data.val[1]), f"{cal['ece_uncalibrated']:.4f}", f"{cal['ece']:.4f}",
             f"{cal['accuracy']:.4f}", f"{cal['accuracy']:.4f}"],
            ['test', len(y), f"{ece0:.4f}", f"{ece1:.4f}", f"{acc0:.4f}", f"{acc1:.4f}"]]
    cols = ['split', 'images', 'ECE uncalibrated', 'ECE calibrated', 'accuracy uncalibrated', 'accuracy calibrated']
    figs = dict(run=ck_path.parent.name, recipe=recipe, temperature=round(t, 4),
                val_ece_uncalibrated=round(cal['ece_uncalibrated'], 4), val_ece=round(cal['ece'], 4),
                test_ece_uncalibrated=round(ece0, 4), test_ece=round(ece1, 4), test_accuracy=acc1,
                test_accuracy_unchanged=acc0 == acc1, target_test_ece=TARGET, target_met=ece1 <= TARGET,
                onnx_top1_agreement=agree['onnx_top1_agreement'], onnx_max_abs_diff=agree['onnx_max_abs_diff'])
    notes = [f"Run {figs['run']} ({recipe}); temperature {t:.4f} fitted on the validation split (L-BFGS on log T, "
             "minimising the NLL), 15 equal-width confidence bins.",
             f"Test ECE {ece0:.4f} -> {ece1:.4f} (target at most {TARGET}: {'met' if ece1 <= TARGET else 'NOT met'}); "
             f"test accuracy {acc0:.4f} before and {acc1:.4f} after.",
             f"The calibrated model exported to ONNX agrees with PyTorch on the test split: top-1 agreement "
             f"{agree['onnx_top1_agreement']:.4f}, max probability difference {agree['onnx_max_abs_diff']:.1e}."]
    print(table(cols, rows)); print(*notes, sep='\n')
    save('calibration', rows, cols, notes, figs)


if __name__ == '__main__':
    main()
