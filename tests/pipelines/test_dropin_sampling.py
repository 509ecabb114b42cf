"""Drop-in use: the README's "Secure sampling from Python" example runs as written (main
guard, replicated backend, image shape from ``unet.config``), a Python int timestep is exported
once, and a launching script without the main guard fails at once with the parties' reason."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import cipherdm_torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "secure_sampling_python.py")


def readme_block() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Secure sampling from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tiny_unet_dir(folder) -> str:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D")).save_pretrained(str(folder))
    return str(folder)


def test_readme_example_is_the_example_script():
    block = readme_block()
    with open(EXAMPLE) as f:
        script = f.read()
    code, main = block.split('\n\nif __name__ == "__main__":')
    assert code.strip() in script            # imports and job: verbatim
    assert "launch(job" in main and "replicated_backend()" in code


def _example_job(path, model_dir, steps, batch):
    spec = importlib.util.spec_from_file_location("secure_sampling_python", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.job(model_dir, steps, batch)


def test_example_job_samples_at_the_configured_shape(parties, tmp_path):
    model_dir = tiny_unet_dir(tmp_path / "unet")
    results = parties.run(_example_job, EXAMPLE, model_dir, 2, 1, timeout=600)
    user = cipherdm_torch.Roles().user
    for rank, (images, report) in enumerate(results):
        if rank == user:
            assert tuple(images.shape) == (1, 1, 8, 8)        # from unet.config, not 28x28
            assert torch.isfinite(images).all()
        else:
            assert images is None
        assert len(report["steps"]) == 2 and report["total"]["bytes_sent"] > 0


class _TimeMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 4)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, sample, timestep):
        t = torch.as_tensor(timestep).reshape(-1).long()
        return self.lin(sample) + self.emb(t)


def _int_timestep_body():
    from cipherdm_torch import encrypt

    info = cipherdm_torch.party()
    torch.manual_seed(0 if info.is_owner else 5)
    model = _TimeMLP().eval()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    enc = encrypt(model, {"sample": x, "timestep": 999})
    sx = enc.share_input("sample", x if info.is_user else None)
    outs = [enc.reveal(enc(sx, t)) for t in (999, 500, 3)]
    return outs, len(enc._graphs)


def test_python_int_timestep_is_exported_once(parties):
    results = parties.run(_int_timestep_body, timeout=240)
    outs, graphs = results[cipherdm_torch.Roles().user]
    assert graphs == 1 and all(g == 1 for _, g in results)
    torch.manual_seed(0)
    model = _TimeMLP().eval()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    for t, got in zip((999, 500, 3), outs):
        with torch.no_grad():
            assert (got - model(x, t)).abs().max() < 1e-3


def test_launch_without_main_guard_fails_at_once_with_the_reason(tmp_path):
    script = tmp_path / "noguard.py"
    script.write_text("import cipherdm_torch\n\n\ndef job():\n    return 1\n\n\n"
                      "print(cipherdm_torch.launch(job))\n")
    # a long start-up bound: the run must end with the reason, not by running out of time (a
    # wall-clock bound here would fail on a loaded machine)
    env = {**os.environ, "CIPHERDM_START_TIMEOUT": "600"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=700, cwd=str(tmp_path), env=env)
    assert proc.returncode != 0
    last = [ln for ln in proc.stderr.splitlines() if "PartyError" in ln][-1]
    assert "__main__" in last and "launch()" in last, last
    assert "did not finish" not in proc.stderr


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    """The README block itself as a script (tiny model, 1 step, batch 1) in a fresh launch."""
    model_dir = tiny_unet_dir(tmp_path / "unet")
    code = readme_block().replace('launch(job, "path/to/unet")',
                                  f'launch(job, {model_dir!r}, 1, 1)')
    code += "    print('SHAPE', tuple(images.shape))\n"
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHAPE (1, 1, 8, 8)" in proc.stdout
