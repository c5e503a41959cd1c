"""vast_startup.sh: static checks, its detection helpers (sourced), and a real CPU install run twice in a sandbox.

The install test builds a venv with the local CPU torch wheel (TORCH_SPEC=torch==2.13.0, TORCH_INDEX_URL=default
so pip uses its configured sources) and the csmcli editable install: about a minute on the CI machine.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "vast_startup.sh"
HAS_GPU = shutil.which("nvidia-smi") is not None


def run_script(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def source_and_run(snippet: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Source the script (defines its functions, runs nothing) and run `snippet` in that shell."""
    return subprocess.run(
        ["bash", "-c", f'source "$1"\n{snippet}', "vast-test", str(SCRIPT)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def sandbox_env(tmp: Path) -> dict[str, str]:
    """The machine's environment minus anything that would leak a real HF cache, token, venv or torch choice."""
    dropped = ("HF_", "HUGGING_FACE", "CSMCLI_", "TORCH_", "VIRTUAL_ENV", "PYTHON")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    # HOME moves into the sandbox, which would hide the user's pip.conf (local wheel mirrors): keep pip's sources.
    for conf in (Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"):
        if "PIP_CONFIG_FILE" not in env and conf.is_file():
            env["PIP_CONFIG_FILE"] = str(conf)
    env.update(
        HOME=str(tmp),
        CSMCLI_LOG=str(tmp / "vast_startup.log"),
        CSMCLI_WORKSPACE=str(tmp / "workspace"),
        CSMCLI_SKIP_APT="1",
        HF_HUB_OFFLINE="1",
    )
    return env


# ---- static checks -------------------------------------------------------------------------------------------------


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_help_lists_flags_and_env(tmp_path):
    result = run_script("--help", env=sandbox_env(tmp_path), cwd=tmp_path, timeout=30)
    assert result.returncode == 0
    for word in ("--cpu", "--no-model", "--venv", "--skip-bench", "TORCH_SPEC", "TORCH_INDEX_URL", "HF_TOKEN"):
        assert word in result.stdout
    assert not (tmp_path / "vast_startup.log").exists(), "--help should not start a log"


def test_unknown_flag_is_a_usage_error(tmp_path):
    result = run_script("--frobnicate", env=sandbox_env(tmp_path), cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert "Unknown argument: --frobnicate" in result.stderr


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without nvidia-smi")
def test_without_gpu_stops_before_installing(tmp_path):
    start = time.monotonic()
    result = run_script("--venv", str(tmp_path / "venv"), env=sandbox_env(tmp_path), cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert "No NVIDIA GPU" in result.stdout and "nvidia-smi" in result.stdout
    assert "--cpu" in result.stdout, "should say how to go on without a GPU"
    assert not (tmp_path / "venv").exists()
    assert time.monotonic() - start < 20


# ---- detection helpers, sourced ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("driver_cuda", "tag"),
    [("13.4", "cu132"), ("13.2", "cu132"), ("13.1", "cu130"), ("13.0", "cu130"), ("12.9", "cu128"),
     ("12.8", "cu128"), ("12.6", "cu126"), ("12.2", "cu126"), ("11.8", None), ("n/a", None)],
)  # fmt: skip
def test_driver_cuda_picks_torch_index(driver_cuda, tag):
    result = source_and_run(f'torch_cuda_tag "{driver_cuda}"')
    assert (result.stdout.strip() if result.returncode == 0 else None) == tag


NVIDIA_SMI_BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.124.06             Driver Version: 570.124.06     CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
"""


def fake_nvidia_smi(bin_dir: Path, banner: str, query: str, rc: int = 0) -> dict[str, str]:
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --query-gpu*) printf "%s\\n" "{query}";; *) cat <<"EOF"\n{banner}EOF\n;; esac\nexit {rc}\n'
    )
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_gpu_check_reads_driver_and_picks_index(tmp_path):
    env = fake_nvidia_smi(tmp_path / "bin", NVIDIA_SMI_BANNER, "NVIDIA GeForce RTX 5090, 32607 MiB, 570.124.06")
    result = source_and_run('check_gpu; pick_torch_index; echo "index=$TORCH_INDEX"', env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GPU: NVIDIA GeForce RTX 5090" in result.stdout
    assert "CUDA up to 12.8" in result.stdout
    assert "index=https://download.pytorch.org/whl/cu128" in result.stdout


def test_gpu_check_explains_nvidia_smi_without_gpu(tmp_path):
    env = fake_nvidia_smi(tmp_path / "bin", "", "No devices were found", rc=6)
    result = source_and_run("check_gpu", env)
    assert result.returncode == 1
    assert "nvidia-smi found no GPU: No devices were found" in result.stdout
    assert "--cpu" in result.stdout
    cpu = source_and_run("CPU_MODE=1; check_gpu; pick_torch_index; echo index=$TORCH_INDEX", env)
    assert cpu.returncode == 0 and "index=https://download.pytorch.org/whl/cpu" in cpu.stdout


def test_torch_index_overrides():
    result = source_and_run(
        'CPU_MODE=1; TORCH_INDEX_URL=default pick_torch_index; echo "a=[$TORCH_INDEX]"\n'
        'TORCH_INDEX_URL=https://example.invalid/simple pick_torch_index; echo "b=[$TORCH_INDEX]"'
    )
    assert "a=[]" in result.stdout, "default = pip's configured sources, no --index-url"
    assert "b=[https://example.invalid/simple]" in result.stdout


def test_missing_system_packages_and_apt_privileges():
    stubs = """
dpkg-query() { [[ ${*: -1} == libsndfile1 ]] && printf 'install ok installed'; return 0; }
apt-get() { echo "APT CALLED"; }
"""
    missing = source_and_run(stubs + "missing_packages libportaudio2 libsndfile1")
    assert missing.stdout.split() == ["libportaudio2"]

    skipped = source_and_run(stubs + "CSMCLI_SKIP_APT=1 install_system_packages")
    assert "not installing libportaudio2" in skipped.stdout and "APT CALLED" not in skipped.stdout

    root = source_and_run(stubs + "id() { echo 0; }; apt_runner")
    assert root.stdout.strip() == "root"
    with_sudo = source_and_run(stubs + "id() { echo 1000; }; sudo() { return 0; }; apt_runner")
    assert with_sudo.stdout.strip() == "sudo"
    nobody = source_and_run(stubs + "id() { echo 1000; }; sudo() { return 1; }; install_system_packages")
    assert "APT CALLED" not in nobody.stdout
    assert "sudo apt-get install -y libportaudio2" in nobody.stdout


@pytest.mark.parametrize(("python3", "python311", "expected"), [
    ("3.12.3-0ubuntu2", "", "python3"),          # Ubuntu 24.04: its python3 is new enough
    ("3.10.6-1~22.04", "3.11.0~rc1-1~22.04", "python3.11"),  # Ubuntu 22.04: python3.11 from universe
    ("1:3.11.2-1+b1", "", "python3"),            # Debian 12 (an epoch in the version)
    ("3.10.6-1~22.04", "", None),                 # nothing new enough: the script stops with a hint
])
def test_a_missing_python_is_found_in_apt_after_an_update(python3, python311, expected):
    """Images ship without package lists: before `apt-get update` no package has a candidate, so the script
    updates first, then takes python3 if it is new enough, else python3.11."""
    stubs = f"""
updates=0
apt-get() {{ [[ $* == *update* ]] && updates=$((updates + 1)); return 0; }}
apt-cache() {{
  local want=
  if ((updates)); then case ${{*: -1}} in python3) want="{python3}";; python3.11) want="{python311}";; esac; fi
  printf '%s:\n  Installed: (none)\n  Candidate: %s\n' "${{*: -1}}" "${{want:-(none)}}"
}}
id() {{ echo 0; }}
"""
    result = source_and_run(stubs + 'apt_python_package || true; apt_update; echo "updates=$updates"')
    assert result.stdout.split() == [*([expected] if expected else []), "updates=1"], (result.stdout, result.stderr)


def test_hf_home_in_the_venv_follows_the_latest_run(tmp_path):
    """A second run with another HF_HOME must not leave the first one's in the venv's activate script."""
    (tmp_path / "venv/bin").mkdir(parents=True)
    (tmp_path / "venv/bin/activate").write_text("# activate\n")
    run = "VENV_DIR=$1/venv; export HF_HOME=\"$1/{}\"; setup_hf_home >/dev/null; grep -c HF_HOME $VENV_DIR/bin/activate"
    for cache in ("hf A", "hfB", "hfB"):
        result = subprocess.run(["bash", "-c", f'source "$2"\n{run.format(cache)}', "t", str(tmp_path), str(SCRIPT)],
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.split() == ["1"], (result.stdout, result.stderr)  # one export line, never two
        check = subprocess.run(["bash", "-c", f'source "{tmp_path}/venv/bin/activate"; printf %s "$HF_HOME"'],
                               capture_output=True, text=True, timeout=60)
        assert check.stdout == str(tmp_path / cache), check


def test_low_disk_space_warns_with_numbers():
    df_stub = (
        "df() { printf 'Filesystem 1024-blocks Used Available Capacity Mounted on\\n"
        "/dev/vdb 100 90 12582912 90%% /workspace\\n'; }\n"
    )
    result = source_and_run(df_stub + "VENV_DIR=/workspace/csmcli-venv; check_disk; printf '%s\\n' \"${SUMMARY[@]}\"")
    assert result.returncode == 0, result.stderr
    assert "only 12.0 GB free on /workspace" in result.stdout and "20 GB" in result.stdout
    assert "low disk" in result.stdout


def test_find_python_skips_old_interpreters(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("python3", "python3.11", "python3.12", "python3.13", "python3.14"):
        (fake_bin / name).write_text("#!/bin/sh\nexit 1\n")  # answers "too old" to the version probe
        (fake_bin / name).chmod(0o755)
    none = source_and_run("find_python", {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"})
    assert none.returncode != 0
    found = source_and_run("find_python", {"CSMCLI_PYTHON": sys.executable})
    assert found.returncode == 0 and Path(found.stdout.strip()).exists()


# ---- the real thing: CPU install into a sandbox, twice -------------------------------------------------------------


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    """Run `--cpu --no-model --skip-bench` twice in a sandbox; yield both results and the paths."""
    tmp = tmp_path_factory.mktemp("vast")
    (tmp / "workspace").mkdir()
    venv = tmp / "venv"
    env = {
        **sandbox_env(tmp),
        "TORCH_SPEC": "torch==2.13.0",
        "TORCH_INDEX_URL": "default",
        "CSMCLI_PYTHON": sys.executable,
    }
    args = ("--cpu", "--no-model", "--skip-bench", "--venv", str(venv))
    runs = []
    for _ in range(2):
        start = time.monotonic()
        result = run_script(*args, env=env, cwd=tmp)
        runs.append((result, time.monotonic() - start, freeze(venv)))
    return {"tmp": tmp, "venv": venv, "env": env, "first": runs[0], "second": runs[1]}


def freeze(venv: Path) -> str:
    if not (venv / "bin/python").exists():
        return ""
    return subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout


def test_first_run_explains_cpu_mode_and_installs(installs):
    result, _, _ = installs["first"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    out = result.stdout
    assert "No NVIDIA GPU" in out and "CPU mode (--cpu)" in out
    assert "==> [9/9] Benchmark" in out and "--skip-bench: skipped" in out
    assert "Summary" in out and "All done." in out
    log = (installs["tmp"] / "vast_startup.log").read_text()
    assert "==> [1/9] Checking the machine" in log and "Summary" in log


def test_installs_cpu_torch_and_editable_csmcli_into_the_venv(installs):
    python = installs["venv"] / "bin/python"
    probe = subprocess.run(
        [str(python), "-W", "ignore", "-c", "import csmcli, torch; print(csmcli.__file__); print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    csmcli_file, torch_version = probe.stdout.split()
    assert Path(csmcli_file).resolve().is_relative_to(REPO), "editable install should point at this checkout"
    assert torch_version.startswith("2.13.0")


def test_info_json_works_from_the_venv(installs):
    result = subprocess.run(
        [str(installs["venv"] / "bin/csmcli"), "info", "--json"],
        env=installs["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), dict)


def test_hf_home_goes_to_the_workspace(installs):
    activate = (installs["venv"] / "bin/activate").read_text()
    assert f"export HF_HOME={installs['tmp'] / 'workspace' / 'hf'}" in activate
    assert activate.count("export HF_HOME=") == 1, "the second run must not append again"


def test_second_run_is_fast_and_changes_nothing(installs):
    (first, first_s, first_freeze), (second, second_s, second_freeze) = installs["first"], installs["second"]
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    out = second.stdout
    for line in ("venv already exists", "torch already installed", "csmcli already installed", "already set in"):
        assert line in out
    assert "Successfully installed" not in out and "Successfully installed" in first.stdout
    assert second_freeze == first_freeze != ""
    assert second_s < first_s / 2, f"second run {second_s:.0f}s vs first {first_s:.0f}s"


# ---- model step: token and gated-repo answers (hf stubbed) ---------------------------------------------------------

# Nothing cached; `hf auth whoami` fails; `hf download` prints $HF_ANSWER and fails.
MODEL_STUBS = """
model_cached() { return 1; }
hf_cli() { [[ $1 == auth ]] && return 1; printf '%s\\n' "$HF_ANSWER"; return 1; }
"""


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("403 Forbidden: Access to model sesame/csm-1b is restricted and you are not in the authorized list.",
         "not been granted access"),
        ("401 Client Error: Unauthorized. Cannot access gated repo: invalid credentials", "rejected the token"),
        ("Connection reset by peer", "download of sesame/csm-1b failed"),
    ],
)  # fmt: skip
def test_model_download_errors_are_explained(answer, expected):
    result = source_and_run(MODEL_STUBS + "fetch_model", {"HF_TOKEN": "hf_fake", "HF_ANSWER": answer})
    assert result.returncode == 0, "a failed download must not stop the script"
    assert expected in result.stdout
    if expected == "not been granted access":
        assert "https://huggingface.co/sesame/csm-1b" in result.stdout and "hf auth login" in result.stdout


def test_no_token_skips_the_model_with_instructions():
    env = {k: "" for k in ("HF_TOKEN", "HF_ANSWER")}
    result = source_and_run(MODEL_STUBS + 'fetch_model; echo "ready=$MODEL_READY"', env)
    assert result.returncode == 0
    assert "No Hugging Face token" in result.stdout and "https://huggingface.co/sesame/csm-1b" in result.stdout
    assert "ready=0" in result.stdout


# ---- bench step: which command, and a failure is reported (csmcli stubbed) -----------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("CPU_MODE=1", "bench --frames 10 --tiny"),
        ("CPU_MODE=0 MODEL_READY=0", "bench --frames 50 --random-weights"),
        ("CPU_MODE=0 MODEL_READY=1", "bench --frames 50"),
    ],
)
def test_bench_command(tmp_path, state, expected):
    fake = tmp_path / "venv/bin/csmcli"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "CALLED: $*"\n[ -z "$FAIL" ]\n')
    fake.chmod(0o755)
    snippet = f'VENV_DIR="{tmp_path}/venv"; {state}; run_bench; echo "failed=$FAILED"; printf "%s\\n" "${{SUMMARY[@]}}"'
    ok = source_and_run(snippet)
    assert f"CALLED: {expected}\n" in ok.stdout and "failed=0" in ok.stdout
    broken = source_and_run(snippet, {"FAIL": "1"})
    assert broken.returncode == 0 and "failed=1" in broken.stdout and "FAIL  benchmark failed" in broken.stdout
