"""deploy/: the Kubernetes manifests validate against the Kubernetes schema and fit the image and launcher."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

from conftest import needs
from forde.sweep.launch import main, parse_args
from test_sweep import FAST, STUDIES, load

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# the oldest release with every field used on by default (backoffLimitPerIndex is beta in 1.29), and the newest
VERSIONS = ["1.29.0", "latest"]


def validate(doc: dict, version: str) -> None:
    kubernetes_validate = importlib.import_module("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(doc, version, strict=True)


def manifests() -> dict[str, dict]:
    docs = [d for p in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {d["metadata"]["name"]: d for d in docs}


@needs("kubernetes_validate")
@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schema(version):
    docs = manifests()
    assert set(docs) == {"forde-work", "forde-prepare", "forde-sweep"}
    for doc in docs.values():
        validate(doc, version)


@needs("kubernetes_validate")
def test_the_schema_check_rejects_a_broken_job():
    job = manifests()["forde-sweep"]
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo of `resources`
    with pytest.raises(importlib.import_module("kubernetes_validate").ValidationError, match="resource"):
        validate(job, "latest")


def container(job: dict) -> dict:
    [c] = job["spec"]["template"]["spec"]["containers"]
    return c


def test_sweep_is_an_indexed_job_with_one_gpu_per_pod():
    job = manifests()["forde-sweep"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
    assert container(manifests()["forde-sweep"])["resources"]["limits"] == {"nvidia.com/gpu": 1}
    rules = {r["action"]: r for r in job["podFailurePolicy"]["rules"]}
    assert rules["FailJob"]["onExitCodes"]["values"] == [2]  # the launcher's exit code for a bad study or data
    assert rules["Ignore"]["onPodConditions"][0]["type"] == "DisruptionTarget"  # preemption is no failure


def test_pods_fit_the_image_and_the_launcher():
    docker = (REPO / "Dockerfile").read_text()
    data_dir = re.search(r"FORDE_DATA=(\S+)", docker).group(1)
    workdir = re.findall(r"^WORKDIR (\S+)", docker, re.M)[-1]
    assert '"sweeps/launch.py"' in docker.replace("/opt/forde/", '"')  # the entrypoint is the launcher
    volume = manifests()["forde-work"]["metadata"]["name"]
    for name in ("forde-prepare", "forde-sweep"):
        job = manifests()[name]
        pod, c = job["spec"]["template"]["spec"], container(job)
        assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == volume
        mounts = {m["mountPath"]: m["subPath"] for m in c["volumeMounts"]}
        assert mounts == {data_dir: "data", f"{workdir}/studies": "studies"}  # the launcher's default --out
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
        assert env["FORDE_STORAGE"] == {"name": "forde-postgres", "key": "url"}
        args = [a.replace("$(FORDE_STORAGE)", "postgresql://u@db/forde") for a in c["args"]]
        parsed = parse_args(args, STUDIES)
        assert (STUDIES / f"{parsed.study}.yaml").exists() and parsed.storage == "postgresql://u@db/forde"
        assert parsed.prepare == (name == "forde-prepare")
    docs = (REPO / "docs" / "past-one-machine.md").read_text()
    assert "kubectl create secret generic forde-postgres \\\n    --from-literal=url=" in docs


def test_prepare_checks_and_creates_the_study_then_exits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    out = ["--out", str(tmp_path / "studies"), "--no-wandb", *FAST]
    assert main(["--study", "quickstart", "--prepare", *out], studies_dir=STUDIES) == 0
    assert "is checked, its inputs prepared" in capsys.readouterr().out
    assert load(tmp_path).get_trials() == [] and list((tmp_path / "data" / "pca").glob("pca-digits-*.pt"))
    assert not (tmp_path / "studies" / "quickstart" / "runs").exists()
    # a worker started afterwards with the same study and storage (a pod of deploy/sweep.yaml) runs it
    assert main(["--study", "quickstart", "--n-trials", "1", *out], studies_dir=STUDIES) == 0
    assert len(load(tmp_path).get_trials()) == 1
