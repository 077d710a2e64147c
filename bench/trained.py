"""The model a benchmark measures: the checkpoint given with `--model`, or the default recipe trained first."""
from pathlib import Path
from digit_recognition.config import seed_everything
from digit_recognition.model import get_model
from digit_recognition.training import TrainParams, fit

MODEL_HELP = "a checkpoint (best.pt) of a calibrated run; default: train the default recipe first"


def checkpoint(model:str, data, folder) -> Path:
    "`model` (a best.pt) as a path; if empty, the default recipe (settings.ini [train]) trained on `data` in `folder`."
    if model: return Path(model)
    p = TrainParams(device='cpu')
    seed_everything(p.seed)
    fit(get_model(p.model, width=p.width), data, folder, p)
    return Path(folder)/'best.pt'
