"""TLS and standard health checking on the gRPC ingress.

A throwaway CA (made here with `cryptography`, never committed) signs the server's and a client's
certificates. The real ingress server (`serve_grpc` with a fake teacher behind it, and once as the
Ray actor in front of a real app) answers a client that trusts that CA, and fails a plaintext
client, a client trusting another CA and, under mutual TLS, a client without a certificate.
Binding off loopback without TLS and a token is refused at config time unless `grpc.insecure`.
grpc.health.v1 says SERVING while the app answers and NOT_SERVING when it does not or is gone.
"""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_service import EmbedRequest, EmbedResponse, TeacherConfig
from reliability_record import record

TINY = {"model": "ViT-B-32", "pretrained": None, "precision": "fp32", "device": "cpu", "seed": 0,
        "torch_threads": 1,
        "overrides": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ------------------------------------------------------------------------------------ a throwaway PKI
@dataclass
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost and a client certificate it
    signed, plus another CA and a client certificate that one signed. Keys are 0600."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key, issuer: tuple | None, *, ca: bool = False, server: bool = False):
    """A certificate for `key` named `subject`, signed by `issuer` = (name, key) or self-signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                      key_encipherment=False, data_encipherment=False,
                                                      key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, pem: bytes, private: bool = False) -> str:
    path.write_bytes(pem)
    path.chmod(0o600 if private else 0o644)
    return str(path)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(out: Path) -> Pki:
    """Generate the CAs, certificates and keys under `out` (at test time: no key is committed)."""
    files: dict[str, str] = {}
    for prefix, ca_name in (("", "kd-test-ca"), ("other_", "kd-other-ca")):
        ca_key = _key()
        ca_cert = _certificate(ca_name, ca_key, None, ca=True)
        files[f"{prefix}ca"] = _write(out / f"{prefix}ca.pem", _cert_pem(ca_cert))
        client_key = _key()
        issuer = (ca_cert.subject, ca_key)
        files[f"{prefix}client_cert"] = _write(out / f"{prefix}client.pem",
                                               _cert_pem(_certificate("kd-client", client_key, issuer)))
        files[f"{prefix}client_key"] = _write(out / f"{prefix}client.key", _key_pem(client_key), private=True)
        if not prefix:
            server_key = _key()
            files["server_cert"] = _write(out / "server.pem",
                                          _cert_pem(_certificate("kd-teacher", server_key, issuer, server=True)))
            files["server_key"] = _write(out / "server.key", _key_pem(server_key), private=True)
    return Pki(**files)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def with_grpc(**options) -> TeacherConfig:
    """TINY with these gRPC options (`config.GrpcOptions` fields)."""
    return TeacherConfig.from_dict({**TINY, "grpc": options})


def tls_config(pki: Pki, mutual: bool = False, serving: dict | None = None, **options) -> TeacherConfig:
    """TINY with a TLS ingress on a free port (mutual: callers need a certificate), these other gRPC
    options and `serving` fields."""
    return TeacherConfig.from_dict({**TINY, "serving": serving or {}, "grpc": {
        "port": 0, "tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key,
        "tls_client_ca_file": pki.ca if mutual else None, **options}})


# ------------------------------------------------------------------------------------ the ingress in-process
class FakeTeacher:
    """Stands in for the app behind the ingress; `answering` False makes `info` fail like a dead pool."""

    def __init__(self) -> None:
        self.embedded = 0
        self.answering = True

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.embedded += 1
        return EmbedResponse(keys=list(request.keys), image_features=None,
                             text_features=np.zeros((len(request), 4), np.float16), logit_scale=1.0,
                             logit_bias=None, fingerprint="fake")

    async def info(self) -> dict:
        if not self.answering:
            raise ConnectionError("no replica answers")
        return {"fingerprint": "fake", "model": "fake", "embed_dim": 4}

    async def stats(self, all_replicas: bool) -> dict:
        return {}


class RunningIngress:
    """The ingress's servicer, health and gRPC servers on an event loop in a thread, so the test's
    blocking clients call it as any client would."""

    def __init__(self, cfg: TeacherConfig, host: str = "127.0.0.1", health_port: int | None = None):
        from teacher_service.grpc.ingress import AppHealth, TeacherServicer, serve_grpc, serve_health

        self.backend = FakeTeacher()
        self.servicer = TeacherServicer(cfg, self.backend)
        self.health = AppHealth(cfg.serving.app_name)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.run(serve_grpc(self.servicer, host, 0, self.health))
        self.health_server, self.health_port = (None, None) if health_port is None else \
            self.run(serve_health(self.health, host, health_port))

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def update(self, listed: bool = True) -> bool:
        """One poll of the ingress's watch loop (`AppHealth.update`)."""
        return self.run(self.health.update(listed, self.servicer))

    def close(self) -> None:
        for server in (self.server, self.health_server):
            if server is not None:
                self.run(server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> RunningIngress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def embed_once(target: str, **options) -> EmbedResponse:
    from teacher_service.grpc.client import TeacherGrpcClient

    tokens = np.zeros((2, 8), np.int64)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, [5, 6], 49407
    with TeacherGrpcClient(target, timeout_s=10, **options) as client:
        return client.embed(tokens=tokens)


def health_check(target: str, service: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    """grpc.health.v1 Check, as any standard client (grpc_health_probe, the kubelet) sends it."""
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_a_tls_ingress_answers_a_client_that_trusts_its_ca(pki):
    from teacher_service.grpc.client import TlsOptions

    with RunningIngress(tls_config(pki)) as ingress:
        target = f"127.0.0.1:{ingress.port}"
        reply = embed_once(target, tls=TlsOptions(root_ca=pki.ca))
        assert reply.text_features.shape == (2, 4) and ingress.backend.embedded == 1
        # the certificate names localhost too: a client may dial an address and check that name
        assert embed_once(target, tls=TlsOptions(root_ca=pki.ca, server_name="localhost")).fingerprint == "fake"
        ingress.update()
        trusted = grpc.ssl_channel_credentials(root_certificates=Path(pki.ca).read_bytes())
        assert health_check(target, "kd-teacher", trusted) == SERVING


def test_a_plaintext_client_or_one_trusting_another_ca_gets_nothing(pki):
    from teacher_service.grpc.client import TlsOptions

    with RunningIngress(tls_config(pki)) as ingress:
        target = f"127.0.0.1:{ingress.port}"
        assert refused(lambda: embed_once(target)) == grpc.StatusCode.UNAVAILABLE  # no TLS: no handshake
        assert refused(lambda: embed_once(target, tls=TlsOptions(root_ca=pki.other_ca))) == \
            grpc.StatusCode.UNAVAILABLE  # the server's certificate does not verify
        assert refused(lambda: health_check(target, "")) == grpc.StatusCode.UNAVAILABLE
        assert ingress.backend.embedded == 0


def test_mutual_tls_refuses_a_client_without_a_certificate_from_its_ca(pki):
    from teacher_service.grpc.client import TlsOptions

    with RunningIngress(tls_config(pki, mutual=True)) as ingress:
        target = f"127.0.0.1:{ingress.port}"
        assert refused(lambda: embed_once(target, tls=TlsOptions(root_ca=pki.ca))) == grpc.StatusCode.UNAVAILABLE
        stranger = TlsOptions(root_ca=pki.ca, client_cert=pki.other_client_cert, client_key=pki.other_client_key)
        assert refused(lambda: embed_once(target, tls=stranger)) == grpc.StatusCode.UNAVAILABLE
        assert ingress.backend.embedded == 0
        member = TlsOptions(root_ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
        assert embed_once(target, tls=member).keys == ["0", "1"] and ingress.backend.embedded == 1


def test_tls_files_are_checked_when_the_config_is_made(pki, tmp_path):
    from teacher_service.grpc.client import TlsOptions

    shared_key = Path(_write(tmp_path / "shared.key", Path(pki.server_key).read_bytes()))
    shared_key.chmod(0o640)
    cases = {"grpc.tls_key_file .* is readable by other users .*chmod 600":
             {"tls_cert_file": pki.server_cert, "tls_key_file": str(shared_key)},
             r"grpc.tls_key_file \(--grpc-tls-key\): TLS needs both": {"tls_cert_file": pki.server_cert},
             r"grpc.tls_cert_file \(--grpc-tls-cert\): TLS needs both": {"tls_key_file": pki.server_key},
             r"grpc.tls_client_ca_file \(--grpc-tls-client-ca\): mutual TLS needs": {"tls_client_ca_file": pki.ca},
             "grpc.tls_cert_file .* holds no PEM block with 'BEGIN CERTIFICATE'":
             {"tls_cert_file": pki.server_key, "tls_key_file": pki.server_key},
             "grpc.tls_key_file .* No such file": {"tls_cert_file": pki.server_cert,
                                                   "tls_key_file": str(tmp_path / "missing.key")}}
    for message, fields in cases.items():
        with pytest.raises(ValueError, match=message):
            with_grpc(port=0, **fields)
    with pytest.raises(ValueError, match="client_key .* readable by other users"):
        TlsOptions(root_ca=pki.ca, client_cert=pki.client_cert, client_key=str(shared_key)).credentials()
    # replicas never read the ingress's files: they may live on the ingress's node only
    replica_dict = tls_config(pki, mutual=True).replica_dict()
    assert "grpc" not in replica_dict and pki.server_key not in repr(replica_dict)
    replica = TeacherConfig.from_dict(replica_dict).grpc
    assert (replica.tls_cert_file, replica.tls_key_file, replica.port) == (None, None, None)


# ------------------------------------------------------------------------------------ off loopback
def test_binding_off_loopback_needs_tls_and_a_token_unless_insecure(pki, tmp_path, caplog):
    from cluster.cli import build_parser
    from cluster.cli.teacher import teacher_config_from_args
    from teacher_service.grpc.ingress import warn_if_exposed

    token = tmp_path / "token"
    token.write_text("kd-test-token")
    token.chmod(0o600)
    tls = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        wide = {"port": 9000, "host": host}
        with pytest.raises(ValueError, match=r"grpc.host .* not a loopback address.* TLS \(--grpc-tls-cert.*and a "
                                             r"bearer token \(--grpc-token-file.*--grpc-insecure"):
            with_grpc(**wide)
        with pytest.raises(ValueError, match=r"needs a bearer token \(--grpc-token-file"):
            with_grpc(**wide, **tls)
        with pytest.raises(ValueError, match=r"needs TLS \(--grpc-tls-cert"):
            with_grpc(**wide, token_file=str(token))
        guarded = with_grpc(**wide, **tls, token_file=str(token))
        assert guarded.grpc.exposure_gaps() == [] and warn_if_exposed(guarded) is None
    with_grpc(host="0.0.0.0")  # no grpc.port: nothing binds, nothing to refuse
    flags = ["teacher", "serve", "--grpc-port", "9000", "--grpc-host", "0.0.0.0"]
    with pytest.raises(ValueError, match="--grpc-insecure"):
        teacher_config_from_args(build_parser().parse_args(flags))
    insecure = teacher_config_from_args(build_parser().parse_args([*flags, "--grpc-insecure"]))
    assert insecure.grpc.insecure and insecure.grpc.host == "0.0.0.0"
    with caplog.at_level(logging.WARNING, logger="teacher_service.grpc.ingress"):
        warning = warn_if_exposed(insecure)
    assert "0.0.0.0 without TLS" in warning and "without a bearer token" in warning
    assert warning in caplog.text
    cli_tls = teacher_config_from_args(build_parser().parse_args(
        [*flags, "--grpc-tls-cert", pki.server_cert, "--grpc-tls-key", pki.server_key, "--grpc-tls-client-ca", pki.ca,
         "--grpc-token-file", str(token), "--grpc-health-port", "9001"]))
    assert cli_tls.grpc.tls_enabled() and cli_tls.grpc.tls_client_ca_file == pki.ca and cli_tls.grpc.health_port == 9001
    # allowed with the flag: the real server binds every interface (and answers on loopback)
    with RunningIngress(insecure, host="0.0.0.0") as ingress:
        assert embed_once(f"127.0.0.1:{ingress.port}").fingerprint == "fake"


# ------------------------------------------------------------------------------------ health, in-process
def test_health_follows_whether_the_app_answers(pki):
    """NOT_SERVING before the first poll, SERVING while a replica answers (a recent Embed counts
    without a probe), NOT_SERVING when `info` fails or the app is no longer listed. The plaintext
    health port reports the same status; it serves nothing else."""
    from teacher_service.grpc.client import TlsOptions

    with RunningIngress(tls_config(pki), health_port=0) as ingress:
        main, plain = f"127.0.0.1:{ingress.port}", f"127.0.0.1:{ingress.health_port}"
        trusted = grpc.ssl_channel_credentials(root_certificates=Path(pki.ca).read_bytes())
        ingress.run(ingress.health.set(False))  # what the actor does before it listens
        assert health_check(plain, "kd-teacher") == NOT_SERVING
        assert ingress.update() and health_check(plain, "kd-teacher") == SERVING
        for service in ("", "kd.teacher.v1.TeacherService"):
            assert health_check(main, service, trusted) == SERVING
        assert refused(lambda: health_check(plain, "some-other-app")) == grpc.StatusCode.NOT_FOUND
        ingress.backend.answering = False
        assert not ingress.update() and health_check(plain, "kd-teacher") == NOT_SERVING
        embed_once(main, tls=TlsOptions(root_ca=pki.ca))  # a replica just answered an Embed: no probe needed
        assert ingress.update() and health_check(plain, "kd-teacher") == SERVING
        ingress.backend.answering = True
        assert not ingress.update(listed=False) and health_check(main, "kd-teacher", trusted) == NOT_SERVING
        assert refused(lambda: embed_once(plain)) == grpc.StatusCode.UNIMPLEMENTED  # the health port: health only
        ingress.run(ingress.health.shutdown())
        ingress.update()  # a poll after shutdown changes nothing
        assert health_check(plain, "kd-teacher") == NOT_SERVING


# ------------------------------------------------------------------------------------ the real ingress
@pytest.mark.ray
def test_health_over_the_real_tls_ingress_follows_the_app(ray_cluster, pki, tmp_path):
    """The ingress actor in front of a real app, with mutual TLS, a token and a plaintext health
    port: SERVING once the app answers (over both ports), Embed over mutual TLS with the token,
    plaintext refused; after `serve.delete` the health port says NOT_SERVING, then goes away."""
    import time

    from ray import serve

    from cluster.cli.teacher import grpc_banner
    from teacher_service.app import deploy
    from teacher_service.grpc.client import TlsOptions
    from teacher_service.grpc.ingress import WATCH_INTERVAL_S, find_ingress, ingress_addresses

    token = tmp_path / "token"
    token.write_text("kd-tls-token")
    token.chmod(0o600)
    app = "kd-teacher-grpc-tls"
    cfg = tls_config(pki, mutual=True, serving={"app_name": app, "num_cpus": 0.25, "max_batch_size": 64},
                     health_port=0, token_file=str(token))
    deploy(cfg)
    try:
        addresses = ingress_addresses(app)
        plain = addresses["health"]
        assert plain and plain != addresses["grpc"]
        banner = grpc_banner(cfg)  # what `kd teacher serve` prints
        assert f"on {addresses['grpc']} (this machine only; mutual TLS; bearer token required)" in banner
        assert f"grpc.health.v1 alone, plaintext, on {plain}" in banner
        deadline = time.monotonic() + 300
        while health_check(plain, app) != SERVING:
            assert time.monotonic() < deadline, "the app never became SERVING"
            time.sleep(0.5)
        member = TlsOptions(root_ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
        mtls = grpc.ssl_channel_credentials(Path(pki.ca).read_bytes(), Path(pki.client_key).read_bytes(),
                                            Path(pki.client_cert).read_bytes())
        assert health_check(addresses["grpc"], app, mtls) == SERVING
        assert embed_once(addresses["grpc"], app_name=app, token="kd-tls-token", tls=member).text_features.shape[0] == 2
        assert refused(lambda: embed_once(addresses["grpc"], app_name=app, token="kd-tls-token")) == \
            grpc.StatusCode.UNAVAILABLE
        serve.delete(app)
        seen = []
        deadline = time.monotonic() + 10 * WATCH_INTERVAL_S + 30
        while (not seen or seen[-1] != "gone") and time.monotonic() < deadline:
            try:
                status = "NOT_SERVING" if health_check(plain, app) == NOT_SERVING else "SERVING"
            except grpc.RpcError:
                status = "gone"
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.2)
        print(f"health of {app} after serve.delete: {' -> '.join(seen)}")
        record("grpc_health_after_delete", {"app": app, "health_after_serve_delete": seen})
        assert seen[-1] == "gone" and "SERVING" not in seen[1:]  # never SERVING again once it changed
    finally:
        if app in serve.status().applications:
            serve.delete(app)
    deadline = time.monotonic() + 30
    while find_ingress(app) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert find_ingress(app) is None
