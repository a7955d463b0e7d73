"""python exp/bench_variant.py dynamic|static <bench args>: the bench with the compiled layers' shapes forced."""
import faulthandler
import sys

faulthandler.enable()
import torch  # noqa: E402

mode = sys.argv.pop(1)
orig = torch.nn.Module.compile


def compile(self, *args, **kwargs):
    if kwargs.get("mode") == "reduce-overhead":
        kwargs["dynamic"] = mode == "dynamic"
    return orig(self, *args, **kwargs)


torch.nn.Module.compile = compile
from app.cli import main  # noqa: E402

sys.exit(main(["bench"] + sys.argv[1:]))
