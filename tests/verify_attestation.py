#!/usr/bin/env python3
"""Verifies an imgbuild attestation with the in-toto reference libraries,
independently of imgbuild's own code: tests/attest.rs runs it.

    verify_attestation.py ENVELOPE PUBLIC_KEY

ENVELOPE is the `.intoto.json` DSSE envelope, PUBLIC_KEY the minisign
public key file `imgbuild keygen` wrote. Exits 0 and prints the statement's
subjects as JSON when in-toto loads the envelope, securesystemslib verifies
its ed25519 signature over the DSSE PAE, and the payload parses as an
in-toto Statement v1 whose predicate is SLSA Provenance v1 (both through
the in-toto-attestation protobuf bindings, which refuse unknown fields).
Exits 1 with the reason otherwise.
"""

import base64
import json
import sys

from google.protobuf import json_format
from in_toto.models.metadata import Envelope, Metadata
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement
from securesystemslib.signer import SSlibKey


def minisign_public_key(path):
    """The ed25519 key and its minisign key id from a minisign public key
    file: base64 of 'Ed', an 8-byte key id (printed as a little-endian
    number in hex), and the 32-byte key."""
    with open(path, encoding="utf-8") as f:
        lines = [l.strip() for l in f if l.strip()]
    raw = base64.b64decode(lines[-1])
    if len(raw) != 42 or raw[:2] != b"Ed":
        raise ValueError(f"{path} is not a minisign ed25519 public key")
    key_id = "%016X" % int.from_bytes(raw[2:10], "little")
    return key_id, raw[10:42]


def main(envelope_path, key_path):
    key_id, public = minisign_public_key(key_path)
    key = SSlibKey(
        keyid=key_id,
        keytype="ed25519",
        scheme="ed25519",
        keyval={"public": public.hex()},
    )
    envelope = Metadata.load(envelope_path)
    if not isinstance(envelope, Envelope):
        raise ValueError("in-toto did not load a DSSE envelope")
    # Raises unless a signature by this key verifies over the PAE.
    accepted = envelope.verify([key], 1)
    if key_id not in accepted:
        raise ValueError(f"key {key_id} did not sign the envelope")

    statement = json.loads(envelope.payload)
    parsed = statement_pb2.Statement()
    json_format.ParseDict(statement, parsed)
    Statement.copy_from_pb(parsed).validate()
    if parsed.predicate_type != "https://slsa.dev/provenance/v1":
        raise ValueError(f"predicate type {parsed.predicate_type}")
    provenance = provenance_pb2.Provenance()
    json_format.ParseDict(statement["predicate"], provenance)
    if not provenance.build_definition.build_type:
        raise ValueError("the provenance has no buildType")
    if not provenance.run_details.builder.id:
        raise ValueError("the provenance has no builder id")
    print(
        json.dumps(
            {
                "key_id": key_id,
                "subjects": statement["subject"],
                "build_type": provenance.build_definition.build_type,
                "invocation_id": provenance.run_details.metadata.invocation_id,
                "dependencies": len(provenance.build_definition.resolved_dependencies),
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        main(sys.argv[1], sys.argv[2])
    except Exception as err:  # every failure is a verdict, with its reason
        print(f"verification failed: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
