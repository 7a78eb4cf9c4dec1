#!/usr/bin/env python3
"""Validates imgbuild's SBOM documents with the reference implementations:
spdx-tools for SPDX 2.3 JSON, cyclonedx-python-lib (with its JSON schema
validation) for CycloneDX 1.5 JSON.

    validate_sbom.py --spdx FILE --cyclonedx FILE

Exits 0 when both parse and validate, and prints one JSON object on stdout:
for each format, the sorted "name version" of every package (the image's
own package left out), for the caller to compare with the machine's
package database. Exits 1 with the reasons on stderr otherwise.
"""

import argparse
import json
import sys


def spdx_packages(path):
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    document = parse_file(path)
    problems = validate_full_spdx_document(document, "SPDX-2.3")
    if problems:
        for problem in problems:
            print(f"SPDX: {problem.validation_message} ({problem.context})", file=sys.stderr)
        return None
    described = {
        r.related_spdx_element_id
        for r in document.relationships
        if r.relationship_type.name == "DESCRIBES"
    }
    return sorted(
        f"{p.name} {p.version}" for p in document.packages if p.spdx_id not in described
    )


def cyclonedx_packages(path):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from cyclonedx.model.bom import Bom

    with open(path, encoding="utf-8") as f:
        text = f.read()
    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
    if error is not None:
        # The schema error's own message; its repr holds the whole schema.
        print(f"CycloneDX: {getattr(error.data, 'message', error)}", file=sys.stderr)
        return None
    bom = Bom.from_json(json.loads(text))
    for component in bom.components:
        if component.purl is None:
            print(f"CycloneDX: component {component.name} has no purl", file=sys.stderr)
            return None
    return sorted(f"{c.name} {c.version}" for c in bom.components)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spdx")
    parser.add_argument("--cyclonedx")
    args = parser.parse_args()
    result = {}
    ok = True
    if args.spdx:
        result["spdx"] = spdx_packages(args.spdx)
        ok = ok and result["spdx"] is not None
    if args.cyclonedx:
        result["cyclonedx"] = cyclonedx_packages(args.cyclonedx)
        ok = ok and result["cyclonedx"] is not None
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
