# Shared by the benchmark scripts (sourced, not run): the fast backend they all proxy to.

# Writes an NGINX config for a backend answering every request at once with a 35-byte JSON body,
# one worker, no access log: the backend costs as little as possible, so the proxy in front is
# what is measured.   fast_backend_conf WORKDIR PORT > FILE
fast_backend_conf() {
  cat <<NGX
worker_processes 1;
pid $1/backend.pid;
error_log $1/backend.err;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$2;
    location / { default_type application/json; return 200 '{"sentiment":"neutral","score":0.5}'; }
  }
}
NGX
}
