"""Opens N keep-alive connections to a proxy, sends one small GET on each, reads the answer and
keeps the connection open and idle; prints how much the proxy's RSS grew per connection.

    python3 tests/bench/idle_conns.py PID PORT [N=5000] [HEALTH_PORT]

With HEALTH_PORT, RSS is read once more after three `GET /healthz` on that port a second apart
(what a container health check or a load balancer's probe does to an otherwise idle process).

Used by tests/bench/idle_memory.sh for NGINX and Breakwater side by side. Loopback only.
"""

import asyncio
import sys


def rss_kib(pid):
    # NGINX's memory is in its worker processes: sum the process and its children.
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def one(port, conns):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/idle HTTP/1.1\r\nhost: bench\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    conns.append(writer)
    if head.startswith(b"HTTP/1.1 200"):
        return None
    reason = [l for l in head.split(b"\r\n") if l.lower().startswith(b"x-breakwater-reason")]
    return (head.split(b"\r\n")[0] + b" " + b"".join(reason)).decode(errors="replace")


async def main():
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    conns = []
    other = {}
    for start in range(0, n, 200):
        batch = await asyncio.gather(*(one(port, conns) for _ in range(min(200, n - start))))
        for answer in batch:
            if answer is not None:
                other[answer] = other.get(answer, 0) + 1
    ok = n - sum(other.values())
    await asyncio.sleep(2)
    after = rss_kib(pid)
    print(f"{n} idle connections, {ok} answered 200: RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
          f"{(after - before) / n:.1f} KiB per connection" + (f"; other answers: {other}" if other else ""))
    if len(sys.argv) > 4:
        for _ in range(3):
            await asyncio.sleep(1)
            reader, writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[4]))
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            await reader.read()
            writer.close()
        await asyncio.sleep(0.5)
        probed = rss_kib(pid)
        print(f"{'':12}the same {n}, after three health checks a second apart: RSS {probed / 1024:.1f} MiB, "
              f"{(probed - before) / n:.1f} KiB per connection")
    # An allocator may hand freed memory back to the system only when it next does some work
    # (mimalloc's delayed purge): the same idle connections once other traffic has gone on.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(1000):
        writer.write(b"GET /v1/busy HTTP/1.1\r\nhost: bench\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
        await reader.readexactly(length[0] if length else 0)
    writer.close()
    await asyncio.sleep(1)
    busy = rss_kib(pid)
    print(f"{'':12}the same {n}, after 1000 requests on another connection: RSS {busy / 1024:.1f} MiB, "
          f"{(busy - before) / n:.1f} KiB per connection")
    for w in conns:
        w.close()


asyncio.run(main())
