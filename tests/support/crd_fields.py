"""Field names of KubeRay's CRDs, for checking the manifests in cluster_configs/kuberay.

`kuberay_fields.json.gz` holds the RayCluster and RayJob schemas of KubeRay v1.5.1 (the oldest
release the manifests support), reduced to their field names: from
ray-project/kuberay `ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml` at tag
v1.5.1 by `python -m tests.support.crd_fields CRD.yaml ...` (descriptions and types dropped).
The pod templates inside are Kubernetes' own PodTemplateSpec, so a misspelt pod field is caught
too.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

FIELDS = Path(__file__).with_name("kuberay_fields.json.gz")
ANY = "*"  # x-kubernetes-preserve-unknown-fields or a free-form object


def reduce(schema: dict):
    """A schema's field names: {"p": {name: ...}} for objects, {"m": ...} for maps, {"i": ...} for lists."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return ANY
    if "properties" in schema:
        return {"p": {name: reduce(sub) for name, sub in schema["properties"].items()}}
    if isinstance(schema.get("additionalProperties"), dict):
        return {"m": reduce(schema["additionalProperties"])}
    if "items" in schema:
        return {"i": reduce(schema["items"])}
    return None  # a scalar (or an int-or-string)


def unknown_fields(manifest, fields, where: str = "") -> list[str]:
    """The dotted paths in `manifest` that its CRD's field tree has no room for."""
    if fields == ANY or fields is None and not isinstance(manifest, (dict, list)):
        return []
    if isinstance(manifest, dict):
        if fields is None or not ("p" in fields or "m" in fields):
            return [f"{where}: an object where the CRD has a value"]
        out = []
        for key, value in manifest.items():
            if "m" in fields:
                out += unknown_fields(value, fields["m"], f"{where}.{key}")
            elif key not in fields["p"]:
                out.append(f"{where}.{key}".lstrip("."))
            else:
                out += unknown_fields(value, fields["p"][key], f"{where}.{key}")
        return out
    if isinstance(manifest, list):
        if fields is None or "i" not in fields:
            return [f"{where}: a list where the CRD has none"]
        return [e for i, item in enumerate(manifest) for e in unknown_fields(item, fields["i"], f"{where}[{i}]")]
    return []


def load() -> dict:
    return json.loads(gzip.decompress(FIELDS.read_bytes()))


def main(paths: list[str]) -> None:
    import yaml

    kinds = {}
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        kinds[crd["spec"]["names"]["kind"]] = reduce(version["schema"]["openAPIV3Schema"])
    FIELDS.write_bytes(gzip.compress(json.dumps(kinds, sort_keys=True, separators=(",", ":")).encode(), mtime=0))


if __name__ == "__main__":
    main(sys.argv[1:])
