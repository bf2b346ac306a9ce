"""nchan as a contestant: nginx with Debian's nchan module, started with a generated config.

Two flavours on the same nginx: messages kept in nchan's shared memory (`nchan-memory`),
or in Redis (`nchan-redis`, the bench's own redis-server through an `upstream` block with
`nchan_redis_server`, nchan's default "distributed" storage mode, in which every publish
goes through Redis and every nginx subscribes there). Subscribers use nchan's EventSource
endpoint; publishers POST to its publisher endpoint. Both keep the same history per channel
as the service keeps per session in the bench (its log length and session TTL), so a late
subscriber can be served from it in either design.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

NGINX_PATHS = ("/usr/sbin/nginx",)
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
INSTALL_HINT = "apt-get install nginx libnginx-mod-nchan"

SUBSCRIBE_PATH = "/sub"
PUBLISH_PATH = "/pub"
HEALTH_PATH = "/healthz"
# What the bench's service worker keeps per session: its log length and session TTL.
MESSAGE_BUFFER_LENGTH = 1000
MESSAGE_TIMEOUT_S = 600
# nchan's store is one shared-memory slab; pages count in PSS only once touched.
SHARED_MEMORY = "512M"


def nginx_binary() -> str | None:
    """The nginx executable, or None."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in NGINX_PATHS if Path(p).is_file()), None)


def nchan_missing(module: Path = NCHAN_MODULE) -> str | None:
    """Why nchan cannot run here, or None when nginx and the module are installed."""
    if nginx_binary() is None:
        return f"nginx is not installed ({INSTALL_HINT})"
    if not module.is_file():
        return f"the nchan module is not installed, no {module} ({INSTALL_HINT})"
    return None


def redis_server_line(redis_url: str) -> str:
    """The `nchan_redis_server` argument for the bench's Redis URL (credentials as given).

    nchan speaks TCP to Redis; a unix-socket URL cannot be given to it.
    """
    parsed = urlparse(redis_url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"nchan needs a redis:// URL, not {parsed.scheme}://")
    address = parsed.netloc if parsed.port else f"{parsed.netloc}:6379"
    return f"{parsed.scheme}://{address}/{parsed.path.strip('/') or '0'}"


def nginx_config(
    *,
    port: int,
    workdir: Path,
    module: Path = NCHAN_MODULE,
    redis_url: str | None = None,
    workers: int = 1,
    max_connections: int = 20000,
) -> str:
    """A complete nginx.conf: one loopback server, a subscriber and a publisher location.

    `redis_url` selects the Redis store; without it messages stay in shared memory.
    Everything nginx writes (pid, error log, temp files) stays in `workdir`.
    """
    upstream = store = ""
    if redis_url is not None:
        server = redis_server_line(redis_url)
        upstream = f"  upstream bench_redis {{ nchan_redis_server {server}; }}\n"
        store = "      nchan_redis_pass bench_redis;\n"
    temp = "\n".join(
        f"  {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
load_module {module};
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {max_connections + 100};
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{
  worker_connections {max_connections};
  multi_accept on;
}}
http {{
  access_log off;
{temp}
  # Publishers keep their connections and pipeline requests: never close them.
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  nchan_shared_memory_size {SHARED_MEMORY};
{upstream}  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = {SUBSCRIBE_PATH} {{
{store}      nchan_subscriber eventsource;
      nchan_channel_id $arg_id;
      # A subscriber gets what its channel holds, then live: nothing published after
      # its request arrived can be missed.
      nchan_subscriber_first_message oldest;
    }}
    location = {PUBLISH_PATH} {{
{store}      nchan_publisher;
      nchan_channel_id $arg_id;
      nchan_message_buffer_length {MESSAGE_BUFFER_LENGTH};
      nchan_message_timeout {MESSAGE_TIMEOUT_S}s;
    }}
    location = {HEALTH_PATH} {{
      return 200 "ok\\n";
    }}
  }}
}}
"""


def nginx_command(nginx: str, config: Path, workdir: Path) -> list[str]:
    return [nginx, "-c", str(config), "-p", str(workdir), "-e", str(workdir / "error.log")]
