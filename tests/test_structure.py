"""Every script in algos/ is self-contained and follows the anatomy of DESIGN.md."""

import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import ALGOS, ALGOS_DIR, ROOT

# import name -> requirements.txt distribution
ALLOWED = {"numpy": "numpy", "torch": "torch", "gymnasium": "gymnasium", "tyro": "tyro",
           "tensorboard": "tensorboard", "ale_py": "ale-py", "mpe2": "mpe2", "pettingzoo": "pettingzoo"}
OPTIONAL = {"wandb"}  # imported only inside a function, when --track asks for it


def source(name):
    with open(os.path.join(ALGOS_DIR, f"{name}.py")) as f:
        return f.read()


def requirements():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [ln.split("#")[0].strip() for ln in f]
    return {re.split(r"[\[<>=!~ ;]", ln)[0].lower() for ln in lines if ln}


def test_roster_present():
    for name in ["reinforce", "actor_critic", "a2c", "ppo", "ppo_continuous"]:
        assert name in ALGOS, f"algos/{name}.py is missing"


def test_allowed_packages_are_required():
    reqs = requirements()
    for dist in ALLOWED.values():
        assert dist in reqs, f"{dist} is imported by scripts but not in requirements.txt"


@pytest.mark.parametrize("name", ALGOS)
def test_imports_only_allowed_packages(name):
    tree = ast.parse(source(name))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}.py: relative import"
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            root = module.split(".")[0]
            if root in sys.stdlib_module_names or root in ALLOWED:
                continue
            assert root in OPTIONAL and id(node) not in top_level, f"{name}.py imports {module}"
            assert not os.path.exists(os.path.join(ROOT, root)), f"{name}.py imports the local {root}"


@pytest.mark.parametrize("name", ALGOS)
def test_anatomy(name):
    text = source(name)
    tree = ast.parse(text)
    doc = ast.get_docstring(tree)
    assert doc and re.search(r"arXiv|\((19|20)\d\d\)", doc), f"{name}.py: docstring names no paper"
    tags = set(re.findall(r"\\tag\{(\d+)\}", doc))
    assert tags, f"{name}.py: docstring has no numbered equations"
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for required in ["Args", "make_env", "train"]:
        assert required in names, f"{name}.py has no {required}"
    assert 'if __name__ == "__main__":' in text
    code = text[text.index('"""', 3) + 3:]
    comments = [line.split("#", 1)[1] for line in code.splitlines() if "#" in line]
    referenced = {n for c in comments for n in re.findall(r"\((\d+)\)", c)}
    assert tags == referenced, f"{name}.py: equations {sorted(tags - referenced)} have no line, lines cite {sorted(referenced - tags)}"
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    fields = [n.target.id for n in args.body if isinstance(n, ast.AnnAssign)]
    for shared in ["exp_name", "seed", "torch_deterministic", "cuda", "track", "wandb_project_name", "wandb_entity",
                   "capture_video", "save_model", "eval_checkpoint", "eval_episodes", "env_id", "total_timesteps",
                   "num_envs", "gamma"]:
        assert shared in fields, f"{name}.py: Args has no {shared}"
    # one learning rate, or CleanRL's pair for actor-critic methods with two optimisers
    assert "learning_rate" in fields or {"policy_lr", "q_lr"} <= set(fields), f"{name}.py: Args has no learning rate"
    # every field has a docstring right after it (tyro shows it in --help)
    for i, node in enumerate(args.body):
        if isinstance(node, ast.AnnAssign):
            nxt = args.body[i + 1] if i + 1 < len(args.body) else None
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), f"{name}.py: Args.{node.target.id} has no docstring"


@pytest.mark.parametrize("name", ALGOS)
def test_help(name):
    out = subprocess.run([sys.executable, os.path.join(ALGOS_DIR, f"{name}.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--total-timesteps" in out.stdout
