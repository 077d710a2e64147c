"""Check training and prediction on a GPU, and record the GPU's benchmark figures.

Runs the library's own training loop (`fit`) on CUDA: the fast recipe (one epoch) and the full default recipe
from settings.ini, measures test accuracy and prediction throughput, and checks that a CUDA-trained model predicts
the same on the CPU. Run where PyTorch sees a GPU:

    python bench/gpu_check.py
    python bench/gpu_check.py --quick                 # smoke run: the fast recipe on 10,000 images
    python bench/gpu_check.py --quick --device cpu    # the script itself, on a machine without a GPU

The table, with date, machine and versions, goes to bench/results/gpu_check.json and .md (a --quick run's to
gpu_check-quick.*); its `figures` are what the notebooks and README quote.
"""
import argparse, dataclasses, time, tempfile
import torch
from digit_recognition.config import get_device, seed_everything
from digit_recognition.data import load_cleaned
from digit_recognition.model import get_model, count_parameters
from digit_recognition.training import TrainParams, fit, evaluate    # imports without MLflow
from digit_recognition.calibration import Probabilities
from results import save, table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cuda', help="'cuda' (default); 'cpu' only to smoke-test the script")
    ap.add_argument('--quick', action='store_true',
                    help="smoke run (fast recipe, 10,000 images) written to bench/results/gpu_check-quick.*")
    a = ap.parse_args()
    dev = get_device(a.device)
    cuda = dev.type == 'cuda'
    assert cuda or a.device == 'cpu', f"no GPU here (device {dev})"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'} | torch {torch.__version__}", flush=True)
    data = load_cleaned()
    base = TrainParams.from_settings(device=str(dev))
    fast = dataclasses.replace(base, epochs=1, augment=False, patience=0)
    recipes = {'fast (1 epoch, no augmentation)': fast, f"default ({base.epochs} epochs)": base}
    if a.quick: recipes = {'fast, first 10,000 images': dataclasses.replace(fast, max_train_samples=10000)}
    rows, figs = [], {}
    for (name, p), key in zip(recipes.items(), ['fast', 'default']):
        seed_everything(p.seed); m = get_model(p.model, width=p.width)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as d: st = fit(m, data, d, p)
        sync(); wall = time.time() - t0
        train_s = sum(h['epoch_seconds'] for h in st['history'])
        acc = evaluate(m, *data.test)['accuracy']
        ips = sum(h['images_per_second'] for h in st['history'])/len(st['history'])
        rows.append([name, len(st['history']), f"{train_s:.1f}", f"{wall:.1f}", f"{acc:.4f}", f"{ips:,.0f}"])
        figs.update({f'{key}_epochs': len(st['history']), f'{key}_training_seconds': round(train_s, 2),
                     f'{key}_wall_seconds': round(wall, 2), f'{key}_test_accuracy': acc,
                     f'{key}_images_per_second': round(ips)})
        last = m
    # prediction throughput and CPU/GPU agreement
    x = data.test[0].to(dev).float()/255
    prob = Probabilities(last).eval()
    with torch.no_grad():
        for _ in range(3): prob(x[:1000])
        sync(); t0 = time.time()
        for i in range(0, len(x), 1000): p_gpu = prob(x[i:i+1000])
        sync(); pred_ips = len(x)/(time.time() - t0)
        p_gpu = prob(x[:500]).cpu(); p_cpu = Probabilities(last.cpu()).eval()(x[:500].cpu())
    agree = (p_gpu.argmax(1) == p_cpu.argmax(1)).float().mean().item()
    figs.update(prediction_images_per_second=round(pred_ips), cpu_gpu_agreement=agree,
                parameters=count_parameters(last))
    print(f"\nmodel cnn, {count_parameters(last):,} parameters, dataset {data.version}\n")
    cols = ['recipe', 'epochs', 'training s', 'wall s', 'test accuracy', 'training images/s']
    print(table(cols, rows))
    notes = [f"prediction: {pred_ips:,.0f} images/s (batches of 1000); "
             f"CPU and GPU agree on {agree:.1%} of 500 test images",
             f"device {dev}, model cnn, {count_parameters(last):,} parameters, dataset {data.version}"]
    print('\n' + notes[0])
    save('gpu_check-quick' if a.quick else 'gpu_check', rows, cols, notes, figs)
    assert agree > 0.99 and (a.quick or figs['default_test_accuracy'] > 0.99)


if __name__ == '__main__':
    main()
