"""Signed secure-aggregation keys (shared/secagg_signing.py, client/secure_aggregation.py): a site whose node config
names the consortium's keys gives its shares only when every keyed site's round keys carry a valid signature of a
distinct consortium key; a server that substitutes, strips, re-signs or replays keys is refused, naming the site."""

from __future__ import annotations

import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.secure_aggregation import answer_keys, answer_shares
from shared.certs import make_certificates
from shared.protocol import (
    SECAGG,
    SECAGG_KEYS,
    SECAGG_MASK_PUBLIC,
    SECAGG_NODES,
    SECAGG_PEERS,
    SECAGG_SHARE_PUBLIC,
    SECAGG_SHARES,
    SECAGG_SIGNATURE,
    SECAGG_SIGNER,
    SECAGG_THRESHOLD,
    SERVER_ROUND,
)
from shared.secagg import KeyPair, SecAggError
from shared.secagg_signing import (
    SIGNING_KEY_NODE_CONFIG,
    TRUSTED_KEYS_NODE_CONFIG,
    Signer,
    key_statement,
    load_signer,
    load_trusted_keys,
)

pytestmark = pytest.mark.usefixtures("task_identity")

SITES = {11: "site-a", 22: "site-b", 33: "site-c"}
RUN, ROUND = 7, 3


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("creds"), sites=list(SITES.values()))


def _ask(node: int, action: str, values: dict) -> Message:
    content = RecordDict({SECAGG: ConfigRecord(values)})
    return Message(content, dst_node_id=node, message_type=f"{MessageType.QUERY}.{action}")


def _contexts(creds, *, verify: bool = True, sign: bool = True) -> dict[int, Context]:
    contexts = {}
    for node, name in SITES.items():
        config = {}
        if sign:
            config[SIGNING_KEY_NODE_CONFIG] = str(creds.sites[name].private_key)
        if verify:
            config[TRUSTED_KEYS_NODE_CONFIG] = str(creds.sites[name].consortium)
        contexts[node] = Context(RUN, node, config, RecordDict(), {})
    return contexts


def _step1(contexts: dict[int, Context]) -> dict:
    """The step-2 request an honest server builds from the sites' step-1 replies."""
    return _step1_of_round(contexts, ROUND)


def _step1_of_round(contexts: dict[int, Context], server_round: int) -> dict:
    keys = {
        node: answer_keys(_ask(node, SECAGG_KEYS, {SERVER_ROUND: server_round}), context).content[SECAGG]
        for node, context in contexts.items()
    }
    nodes = sorted(keys)
    return {
        SERVER_ROUND: server_round,
        SECAGG_THRESHOLD: 2,
        SECAGG_NODES: [str(node) for node in nodes],
        **{
            field: [bytes(keys[node][field]) for node in nodes]
            for field in (SECAGG_MASK_PUBLIC, SECAGG_SHARE_PUBLIC, SECAGG_SIGNER, SECAGG_SIGNATURE)
        },
    }


def _step2(contexts, request: dict, node: int = 11) -> ConfigRecord:
    return answer_shares(_ask(node, SECAGG_SHARES, request), contexts[node]).content[SECAGG]


def test_every_site_gives_its_shares_when_all_keys_are_signed_by_the_consortium(creds):
    contexts = _contexts(creds)
    request = _step1(contexts)
    for node in SITES:
        assert sorted(_step2(contexts, request, node)[SECAGG_PEERS]) == sorted(
            str(n) for n in SITES if n != node
        )


def test_a_substituted_mask_key_is_refused_naming_the_site(creds):
    contexts = _contexts(creds)
    request = _step1(contexts)
    request[SECAGG_MASK_PUBLIC][1] = KeyPair.generate().public  # the server's own key in place of site-b's
    with pytest.raises(SecAggError, match=r"node 22 \(site 'site-b'\) fail signature verification"):
        _step2(contexts, request)


def test_keys_re_signed_by_a_key_outside_the_consortium_are_refused(creds):
    contexts = _contexts(creds)
    request = _step1(contexts)
    forger = Signer(ec.generate_private_key(ec.SECP384R1()), creds.out_dir / "server.key")
    fake = KeyPair.generate().public
    request[SECAGG_MASK_PUBLIC][2] = fake
    statement = key_statement(
        run_id=RUN,
        server_round=ROUND,
        node_id=33,
        mask_public=fake,
        share_public=request[SECAGG_SHARE_PUBLIC][2],
    )
    request[SECAGG_SIGNER][2], request[SECAGG_SIGNATURE][2] = forger.sign(statement)
    with pytest.raises(SecAggError, match="node 33 are signed by a key not listed in .*consortium.pub"):
        _step2(contexts, request)


@pytest.mark.parametrize(("stripped", "named"), [("one", 22), ("all", 11)])
def test_missing_signatures_are_refused(creds, stripped, named):
    contexts = _contexts(creds)
    request = _step1(contexts)
    if stripped == "one":
        request[SECAGG_SIGNATURE][1] = b""
    else:
        del request[SECAGG_SIGNER], request[SECAGG_SIGNATURE]
    with pytest.raises(SecAggError, match=f"node {named} carry no signature"):
        _step2(contexts, request)


def test_a_site_that_does_not_sign_is_refused_by_a_verifying_peer(creds):
    contexts = _contexts(creds)
    contexts[22] = Context(RUN, 22, {}, RecordDict(), {})  # site-b signs nothing
    with pytest.raises(SecAggError, match="node 22 carry no signature"):
        _step2(contexts, _step1(contexts))


def test_signed_keys_replayed_under_another_node_round_or_run_are_refused(creds):
    contexts = _contexts(creds)
    request = _step1(contexts)
    swapped = dict(request, **{SECAGG_NODES: ["11", "33", "22"]})  # site-b's keys presented as node 33's
    with pytest.raises(SecAggError, match="node 33 .*fail signature verification"):
        _step2(contexts, swapped)
    old = contexts[11]
    later_run = Context(
        RUN + 1, 11, dict(old.node_config), old.state, {}
    )  # signed in run 7, checked in run 8
    with pytest.raises(SecAggError, match="node 11 .*fail signature verification"):
        answer_shares(_ask(11, SECAGG_SHARES, request), later_run)
    next_round = _step1_of_round(contexts, ROUND + 1)
    for field in (SECAGG_MASK_PUBLIC, SECAGG_SHARE_PUBLIC, SECAGG_SIGNER, SECAGG_SIGNATURE):
        next_round[field][1] = request[field][1]  # site-b's round-3 keys, validly signed for round 3
    with pytest.raises(SecAggError, match="round 4: .*node 22 .*fail signature verification"):
        _step2(contexts, next_round)


def test_one_site_cannot_vouch_for_two_nodes(creds):
    contexts = _contexts(creds)
    site_b = Signer(load_signer(creds.sites["site-b"].private_key).key, creds.sites["site-b"].private_key)
    request = _step1(contexts)
    statement = key_statement(
        run_id=RUN,
        server_round=ROUND,
        node_id=33,
        mask_public=request[SECAGG_MASK_PUBLIC][2],
        share_public=request[SECAGG_SHARE_PUBLIC][2],
    )
    request[SECAGG_SIGNER][2], request[SECAGG_SIGNATURE][2] = site_b.sign(statement)
    with pytest.raises(SecAggError, match="site 'site-b' already signed another node's keys"):
        _step2(contexts, request)


def test_a_site_refuses_when_the_server_relays_other_keys_for_itself(creds):
    contexts = _contexts(creds)
    request = _step1(contexts)
    request[SECAGG_SHARE_PUBLIC][0] = KeyPair.generate().public
    with pytest.raises(SecAggError, match="other keys for this site \\(node 11\\)"):
        _step2(contexts, request)


def test_without_trusted_keys_a_site_goes_on_and_warns(creds, caplog):
    contexts = _contexts(creds, verify=False, sign=False)
    request = _step1(contexts)
    assert request[SECAGG_SIGNATURE] == [b"", b"", b""]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert len(_step2(contexts, request)[SECAGG_PEERS]) == 2
    assert "taken unverified" in caplog.text and TRUSTED_KEYS_NODE_CONFIG in caplog.text


def test_the_consortium_file_lists_every_site_and_bad_files_are_named(creds, tmp_path):
    trusted = load_trusted_keys(creds.consortium)
    assert sorted(name for name, _ in trusted.values()) == sorted(SITES.values())
    assert creds.sites["site-a"].consortium.read_bytes() == creds.consortium.read_bytes()
    broken = tmp_path / "consortium.pub"
    broken.write_text(creds.consortium.read_text() + "ssh-ed25519 garbage fedabus-x\n")
    with pytest.raises(SecAggError, match=r"consortium.pub:4: not an OpenSSH public key"):
        load_trusted_keys(broken)
    twice = tmp_path / "twice.pub"
    twice.write_text(creds.consortium.read_text().splitlines()[0] + "\n" + creds.consortium.read_text())
    with pytest.raises(SecAggError, match="twice.pub:2: site 'site-a' or its key is listed twice"):
        load_trusted_keys(twice)
    with pytest.raises(SecAggError, match="cannot read the secure-aggregation signing key"):
        load_signer(tmp_path / "missing.key")
    with pytest.raises(SecAggError, match="not an unencrypted OpenSSH or PEM private key"):
        load_signer(creds.sites["site-a"].public_key)
