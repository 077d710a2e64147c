"""Check training and prediction on a GPU, and record the GPU's benchmark figures.

Runs the library's own training loop (`fit`) on CUDA: the fast recipe (one epoch) and the full default recipe
from settings.ini, measures test accuracy and prediction throughput, and checks that a CUDA-trained model predicts
the same on the CPU. Run where PyTorch sees a GPU:

    python bench/gpu_check.py

MLflow and papermill are not needed for this check: on a GPU machine without them (such as a bare accelerator
image), stand-in modules are installed so that `digit_recognition.training` imports; nothing is logged.
"""
import importlib.util, sys, time, types, tempfile
if importlib.util.find_spec('mlflow') is None:        # the accelerator image has PyTorch but not MLflow
    m = types.ModuleType('mlflow'); e = types.ModuleType('mlflow.exceptions')
    e.MlflowException = type('MlflowException', (Exception,), {}); m.exceptions = e
    sys.modules.update({'mlflow': m, 'mlflow.exceptions': e})
if importlib.util.find_spec('papermill') is None: sys.modules['papermill'] = types.ModuleType('papermill')
import torch
from digit_recognition.config import Settings, get_device, seed_everything
from digit_recognition.data import load_cleaned
from digit_recognition.model import get_model, count_parameters
from digit_recognition.training import fit, evaluate, Probabilities


def main():
    dev = get_device('auto')
    assert dev.type == 'cuda', f"no GPU here (device {dev})"
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    data = load_cleaned()
    base = dict(Settings().section('train'), device='cuda')
    recipes = {'fast (1 epoch, no augmentation)': {**base, 'epochs': 1, 'augment': False, 'patience': 0},
               f"default ({base['epochs']} epochs)": base}
    rows = []
    for name, p in recipes.items():
        seed_everything(p['seed']); m = get_model(p['model'])
        t0 = time.time()
        with tempfile.TemporaryDirectory() as d: st = fit(m, data, d, p)
        torch.cuda.synchronize(); wall = time.time() - t0
        train_s = sum(h['epoch_seconds'] for h in st['history'])
        acc = evaluate(m, *data.test)['accuracy']
        ips = sum(h['images_per_second'] for h in st['history'])/len(st['history'])
        rows.append((name, len(st['history']), train_s, wall, acc, ips)); last = m
    # prediction throughput and CPU/GPU agreement
    x = data.test[0].to('cuda').float()/255
    prob = Probabilities(last).eval()
    with torch.no_grad():
        for _ in range(3): prob(x[:1000])
        torch.cuda.synchronize(); t0 = time.time()
        for i in range(0, len(x), 1000): p_gpu = prob(x[i:i+1000])
        torch.cuda.synchronize(); pred_ips = len(x)/(time.time() - t0)
        p_gpu = prob(x[:500]).cpu(); p_cpu = Probabilities(last.cpu()).eval()(x[:500].cpu())
    agree = (p_gpu.argmax(1) == p_cpu.argmax(1)).float().mean().item()
    print(f"\nmodel cnn, {count_parameters(last):,} parameters, dataset {data.version}\n")
    print("| recipe | epochs | training s | wall s | test accuracy | training images/s |\n|---|---|---|---|---|---|")
    for r in rows: print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.4f} | {r[5]:,.0f} |")
    print(f"\nprediction: {pred_ips:,.0f} images/s (batches of 1000); "
          f"CPU and GPU agree on {agree:.1%} of 500 test images")
    assert agree > 0.99 and rows[-1][4] > 0.99


if __name__ == '__main__':
    main()
