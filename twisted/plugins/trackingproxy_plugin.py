"""twistd plugin: ``twistd trackingproxy``. Only points at trackingproxy.tap."""

from twisted.application.service import ServiceMaker

trackingproxy = ServiceMaker(
    "trackingproxy",
    "trackingproxy.tap",
    "HTTPS reverse proxy with ACME certificates for SparkPost tracking domains",
    "trackingproxy",
)
