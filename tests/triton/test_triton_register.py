"""The register helper waits for a Triton to have READY models, within its bound."""

from __future__ import annotations

import argparse

import pytest

from runtimes.sdk.registration import Registration
from runtimes.triton.register import parse_args, registration, split_address, wait_for_models
from runtimes.triton.remote import RemoteModel, RemoteTritonError

MLP = RemoteModel("mlp", "1", "onnxruntime_onnx", (), (), 64, 1000)


def test_waits_through_unreachable_and_loading_until_models_are_ready():
    answers = [RemoteTritonError("Triton at t:8001: failed to connect"), [], [MLP]]
    calls = []

    def lister(address):
        calls.append(address)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for_models("t:8001", wait_s=5, lister=lister, interval_s=0.01) == [MLP]
    assert calls == ["t:8001"] * 3


def test_gives_up_after_wait_s_saying_why():
    def lister(address):
        raise RemoteTritonError("Triton at t:8001: failed to connect")

    with pytest.raises(RemoteTritonError, match="no READY model after 0s: .*failed to connect"):
        wait_for_models("t:8001", wait_s=0.05, lister=lister, interval_s=0.01)


def test_arguments():
    args = parse_args(["--address", "triton:9000", "--discover", "triton:8001", "--models", "mlp"])
    assert args.address == ("triton", 9000) and args.discover == "triton:8001"
    assert args.name == "triton" and args.kind == "triton" and args.models == "mlp"
    for bad in ("triton", "triton:", ":9000", "triton:http"):
        with pytest.raises(argparse.ArgumentTypeError):
            split_address(bad)


async def test_registers_where_every_runtime_does(monkeypatch):
    monkeypatch.delenv("SLUICE_CONSUL_ADDR", raising=False)
    embedded = registration("http://manager:8080", "triton", "triton", "triton", 9000, ["mlp"])
    assert isinstance(embedded, Registration)
    # the manager gives the instance its id: the body names none
    assert embedded.body == {"name": "triton", "kind": "triton", "host": "triton", "port": 9000, "models": ["mlp"]}
    await embedded.client.aclose()
    monkeypatch.setenv("SLUICE_CONSUL_ADDR", "consul:8500")
    consul = registration("http://manager:8080", "triton", "triton", "triton", 9000, ["mlp"])
    assert type(consul).__name__ == "ConsulRegistration"
    assert consul.service["address"] == "triton" and consul.service["port"] == 9000
    assert consul.service["meta"]["models"] == "mlp" and consul.service["meta"]["kind"] == "triton"
