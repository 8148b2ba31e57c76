"""Kubernetes value grammars the pipeline and deploy sections are checked against before any cluster call:
resource quantities, DNS-1123 labels (names, namespaces) and subdomains (Secret names), and OCI image
repositories, tags and digests."""

from __future__ import annotations

QUANTITY = r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


# a Secret's name (an image pull secret): a DNS-1123 subdomain, dot-separated labels (253 characters at
# most: DNS_SUBDOMAIN_MAX, checked apart, pydantic's regex engine has no look-ahead)
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_SUBDOMAIN_MAX = 253


IMAGE_REPO = r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)+$"


IMAGE_TAG = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"


# a pushed image's manifest digest, as a registry returns it (images/build.py push)
IMAGE_DIGEST = r"^sha256:[0-9a-f]{64}$"


def image_reference(repo: str, tag: str, digest: str | None) -> str:
    """``repo@digest`` when the image is pinned by digest, else ``repo:tag``."""
    return f"{repo}@{digest}" if digest else f"{repo}:{tag}"
