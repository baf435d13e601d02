"""Every config under cluster/configs/ is checked: cluster launcher YAMLs by Ray's own schema,
Serve configs by Serve's schema and TeacherConfig, KubeRay manifests for the fields KubeRay
requires; and all of them against the Python side (roles, resource names, app name)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from cluster.roles import (GRPC_RESOURCE, GRPC_ROLE, ROLE_LABEL, STUDENT_RESOURCE, STUDENT_ROLE, TEACHER_RESOURCE,
                           TEACHER_ROLE, student_placement, teacher_placement)
from teacher_service.config import TeacherConfig

CONFIGS = Path(__file__).resolve().parents[1] / "cluster" / "configs"
KUBERAY = CONFIGS / "kuberay"
APP = "kd-teacher"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_rays_schema_and_declare_the_roles(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CONFIGS / name)
    validate_config(prepare_config(config))  # what `ray up` does: provider defaults, then ray-schema.json
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing scheduled on the head
    roles = {t["labels"][ROLE_LABEL]: t for t in types.values()}
    teacher, student = roles[TEACHER_ROLE], roles[STUDENT_ROLE]
    assert TEACHER_RESOURCE in teacher["resources"] and STUDENT_RESOURCE not in teacher["resources"]
    assert STUDENT_RESOURCE in student["resources"] and TEACHER_RESOURCE not in student["resources"]
    assert teacher["min_workers"] >= 1 and student["min_workers"] == 0 < student["max_workers"]
    assert any("/mnt/kd" in cmd for cmd in config["setup_commands"])  # shared storage on every node
    assert any("ray[serve,train,data]==" + ray.__version__ in cmd for cmd in config["setup_commands"])


def test_cluster_serve_config_passes_serves_schema_and_matches_the_roles():
    from ray.serve.schema import ServeDeploySchema

    raw = load(CONFIGS / "serve_teacher_cluster.yaml")
    (app,) = ServeDeploySchema.model_validate(raw).applications
    assert app.name == APP and app.import_path == "teacher_service.serve.deployment:app_builder"
    cfg = TeacherConfig.from_yaml(CONFIGS / "serve_teacher_cluster.yaml")
    serving = cfg.serving
    assert cfg == TeacherConfig.from_dict(app.args) and serving.app_name == APP
    assert {"label_selector": serving.label_selector, "resources": serving.resources} == teacher_placement()
    assert serving.num_gpus == 1 and serving.autoscaling["max_replicas"] >= serving.autoscaling["min_replicas"] >= 1
    opts = serving.serve_options()
    assert opts["autoscaling_config"] == serving.autoscaling and "num_replicas" not in opts


@pytest.mark.parametrize("name", ["serve_teacher.yaml", "serve_teacher_cluster.yaml"])
def test_serve_configs_use_the_sectioned_teacher_config(name):
    """The shipped Serve configs are in the current shape: loading them warns about no flat key, and
    their args hold the model's fields and the `serving` section, nothing flat."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a flat key would raise here
        cfg = TeacherConfig.from_yaml(CONFIGS / name)
    (app,) = load(CONFIGS / name)["applications"]
    assert "serving" in app["args"] and set(app["args"]) <= set(cfg.to_dict())
    assert app["name"] == cfg.serving.app_name  # Serve's name for the app is the one replicas and students use


def _start_params(group: dict) -> tuple[dict, dict]:
    params = group["rayStartParams"]
    labels = dict(item.split("=", 1) for item in params.get("labels", "").split(",") if item)
    resources = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    return labels, resources


def test_kuberay_cluster_has_what_kuberay_requires_and_the_roles():
    rc = load(KUBERAY / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    spec = rc["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for group in [head, *groups.values()]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"].startswith("rayproject/ray:" + ray.__version__)
                                  for c in containers)
        mounts = {m["mountPath"] for c in containers for m in c.get("volumeMounts", [])}
        assert "/mnt/kd" in mounts
    for role, resource in ((TEACHER_ROLE, TEACHER_RESOURCE), (STUDENT_ROLE, STUDENT_RESOURCE)):
        group = groups[role]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        labels, resources = _start_params(group)
        assert labels == {ROLE_LABEL: role} and set(resources) == {resource}
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert resources[resource] == gpus  # one role slot per GPU, as the placement asks one per replica/worker
    assert groups[TEACHER_ROLE]["minReplicas"] >= 1 and groups[STUDENT_ROLE]["minReplicas"] == 0


def test_kuberay_jobs_target_the_long_lived_cluster():
    cluster = load(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    teacher = load(KUBERAY / "rayjob-teacher.yaml")
    student = load(KUBERAY / "rayjob-student.yaml")
    for job in (teacher, student):
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["spec"]["entrypoint"]
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster}
        assert "rayClusterSpec" not in job["spec"]  # attach, never create a cluster per job
        yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert teacher["spec"]["entrypoint"].startswith("kd teacher serve --config /mnt/kd/configs/serve_teacher_cluster.yaml")
    entry = student["spec"]["entrypoint"]
    assert f"--app-name {APP}" in entry and "--role-placement" in entry and "--run-name RUN_NAME" in entry


def test_role_placement_flags_apply_the_roles():
    from cluster.cli import build_parser
    from cluster.cli.teacher import teacher_config_from_args
    from cluster.cli.train import train_config_from_args

    t = teacher_config_from_args(build_parser().parse_args(["teacher", "serve", "--role-placement"]))
    assert {"label_selector": t.serving.label_selector, "resources": t.serving.resources} == teacher_placement()
    s = train_config_from_args(build_parser().parse_args(["train", "--train-shards", "x", "--role-placement"]))
    assert {"worker_label_selector": s.worker_label_selector, "worker_resources": s.worker_resources} == \
        student_placement()


def test_submission_keeps_data_out_and_paths_inside_the_working_dir(tmp_path):
    from cluster.submit import job_path, runtime_env, submission_id

    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    env = runtime_env(str(tmp_path))
    assert env["working_dir"] == str(tmp_path.resolve())
    for name in ["data/train-000000.tar", "runs/r/model.pt", "cache/a.parquet", "kd-demo/report.json",
                 "teacher_service/cache/store.py", "student_trainer/data/batches.py", "cluster/cli/main.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    uploaded = []
    _dir_travel(tmp_path, [_get_excludes(tmp_path, env["excludes"])],
                lambda p: uploaded.append(p.relative_to(tmp_path).as_posix()), True)
    assert {"teacher_service/cache/store.py", "student_trainer/data/batches.py", "cluster/cli/main.py"} <= set(uploaded)
    assert not [p for p in uploaded if p.startswith(("data/", "runs/", "cache/", "kd-demo/"))]  # the user's data stays
    (tmp_path / "run.yaml").write_text("{}")
    assert job_path(str(tmp_path / "run.yaml"), str(tmp_path)) == "run.yaml"
    with pytest.raises(SystemExit, match="does not exist"):
        job_path(str(tmp_path / "missing.yaml"), str(tmp_path))
    a, b = submission_id("train", "my run/1"), submission_id("train", "my run/1")
    assert a != b and a.startswith("kd-train-my-run-1-")


def test_an_in_place_working_dir_is_named_not_uploaded(tmp_path):
    """`--working-dir local:///abs/path`: Ray runs the job in that directory on every node (shared
    storage, the image), so nothing is excluded or uploaded and paths inside it stay relative."""
    from cluster.submit import job_path, runtime_env

    env = runtime_env(f"local://{tmp_path}")
    assert env["working_dir"] == f"local://{tmp_path}" and "excludes" not in env
    (tmp_path / "run.yaml").write_text("{}")
    assert job_path(str(tmp_path / "run.yaml"), f"local://{tmp_path}") == "run.yaml"
    with pytest.raises(SystemExit, match="must be absolute"):
        runtime_env("local://relative/dir")


def test_submission_waits_for_a_starting_cluster_s_job_agent():
    from cluster.submit import submit_job

    class Starting:
        calls = 0

        def submit_job(self, **job):
            self.calls += 1
            if self.calls < 3:
                raise RuntimeError("Request failed with status code 500: No available agent to submit job")
            return job["submission_id"]

    client = Starting()
    assert submit_job(client, submission_id="kd-train-x-1") == "kd-train-x-1" and client.calls == 3

    class Broken:
        def submit_job(self, **job):
            raise RuntimeError("Request failed with status code 400: bad runtime env")

    with pytest.raises(RuntimeError, match="bad runtime env"):
        submit_job(Broken(), submission_id="x")


def _entrypoint_args(job: dict):
    """The `kd ...` entrypoint of a RayJob, parsed by the kd CLI's own parser."""
    import shlex

    from cluster.cli import build_parser

    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "kd"
    return build_parser().parse_args(words[1:])


def test_no_raycluster_pod_waits_for_the_teacher_app():
    """KubeRay submits RayJobs only to a RayCluster whose every pod is Ready: a probe waiting for
    the teacher on any RayCluster pod would block the RayJob that deploys the teacher."""
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(container), container["name"]
            assert not [p for p in container.get("ports", []) if p["name"].startswith("grpc")]


def test_kuberay_grpc_node_serves_the_ingress_its_probe_checks(tmp_path):
    """teacher-grpc.yaml's pod is the node the teacher's deploy job runs on (kd_grpc), exposes the
    ports that job's flags bind, and is Ready only while grpc.health.v1 says the app is SERVING
    (Kubernetes' grpc probe, on the plaintext health port since the kubelet cannot speak TLS)."""
    from cluster.cli.teacher import teacher_config_from_args
    from test_grpc_tls import make_pki

    deployment, service = yaml.safe_load_all((KUBERAY / "teacher-grpc.yaml").read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (node,) = pod["spec"]["containers"]
    assert node["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    start = node["command"][-1]
    assert "ray start --address=kd-head-svc:6379" in start and "--block" in start
    assert f"--labels={ROLE_LABEL}={GRPC_ROLE}" in start
    assert json.loads(start.split("--resources=")[1].split("'")[1]) == {GRPC_RESOURCE: 1}
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}

    job = load(KUBERAY / "rayjob-teacher.yaml")
    assert json.loads(job["spec"]["entrypointResources"]) == {GRPC_RESOURCE: 1}  # the deploy runs on this node
    args = _entrypoint_args(job)
    assert (args.grpc_port, args.grpc_health_port, args.grpc_host) == (ports["grpc"], ports["grpc-health"], "0.0.0.0")
    assert not args.grpc_insecure
    app = TeacherConfig.from_yaml(CONFIGS / "serve_teacher_cluster.yaml").serving.app_name
    probe = node["readinessProbe"]
    assert probe["grpc"] == {"port": ports["grpc-health"], "service": app}  # a number: grpc probes take no port name
    assert "grpc" not in node["livenessProbe"]  # restarting the node cannot bring the ingress back
    assert service["spec"]["ports"] == [{"name": "grpc", "port": ports["grpc"], "targetPort": "grpc"}]

    mount = next(m["mountPath"] for m in node["volumeMounts"] if m["name"] == "grpc-private")
    secret_files = {"grpc_tls_cert": "tls.crt", "grpc_tls_key": "tls.key", "grpc_tls_client_ca": "ca.crt",
                    "grpc_token_file": "token"}
    assert {flag: getattr(args, flag) for flag in secret_files} == {
        flag: f"{mount}/{name}" for flag, name in secret_files.items()}
    # the same flags over real files pass the config's rules (TLS and a token off loopback)
    pki = make_pki(tmp_path)
    token = tmp_path / "token"
    token.write_text("t")
    token.chmod(0o600)
    for flag, path in zip(secret_files, (pki.server_cert, pki.server_key, pki.ca, str(token))):
        setattr(args, flag, path)
    args.config = str(CONFIGS / "serve_teacher_cluster.yaml")
    cfg = teacher_config_from_args(args)
    assert cfg.grpc.exposure_gaps() == [] and cfg.grpc.tls_client_ca_file == pki.ca and cfg.serving.app_name == app


RAY_AUTH_ENV = [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "kd-ray-auth", "key": "auth_token"}}}]


def test_every_kuberay_pod_that_talks_to_ray_has_the_clusters_token_and_not_the_grpc_one():
    """Token authentication (cluster.auth, docs/cluster.md): every Ray container of the RayCluster,
    the gRPC node that joins it and each RayJob's submitter (which runs `ray job submit`) take
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the one Secret kd-ray-auth, as KubeRay's guide wires
    it; the gRPC ingress's token stays in its own Secret, which no Ray variable reads."""
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    pods = {f"raycluster {g.get('groupName', 'head')}": g["template"]["spec"]
            for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]}
    deployment, _ = yaml.safe_load_all((KUBERAY / "teacher-grpc.yaml").read_text())
    pods["teacher-grpc"] = deployment["spec"]["template"]["spec"]
    for name in ("rayjob-teacher.yaml", "rayjob-student.yaml"):
        job = load(KUBERAY / name)["spec"]
        assert job["submissionMode"] == "K8sJobMode"  # a submitter pod, whose template is this one
        pods[name] = job["submitterPodTemplate"]["spec"]
    assert len(pods) == 6
    for name, pod in pods.items():
        for container in pod["containers"]:  # the gRPC node's init container only copies files: not Ray
            assert container["image"].startswith(f"rayproject/ray:{ray.__version__}"), name
            assert container.get("env") == RAY_AUTH_ENV, (name, container["name"])
    grpc_secrets = {v["secret"]["secretName"] for v in pods["teacher-grpc"]["volumes"] if "secret" in v}
    assert grpc_secrets == {"kd-teacher-grpc"} and "kd-ray-auth" not in grpc_secrets
