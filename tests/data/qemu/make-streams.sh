#!/bin/bash
# make-streams.sh -- write the QEMU 10.0 streams and the streams without a device
# description (vmdesc) and configuration section into this folder. See README.md.
#
#   tests/data/qemu/make-streams.sh [NAME...]     (default: every file below)
#
# QEMU 10.0 comes from tools/fetch-qemu.sh (bookworm-backports, unpacked into
# <repo>/.qemu, never installed); QEMU 7.2 is the system's qemu-system-x86_64
# (Debian 12). Override with QEMU_10=PATH / QEMU_7=PATH. A file whose QEMU is missing is
# skipped with a message. Every guest: 16 MiB, TCG, no devices beyond the machine's own,
# paused at start (-S), `cont`, run for 1 s, then migrated by precopy to a file
# (10.0: `file:`, 7.2: `exec:cat > FILE`, since 7.2 has no `file:` transport).
# Existing files are overwritten (MAKE_STREAMS_OUT=DIR writes them elsewhere); the files
# made by hand for 7.2 are not touched.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out_dir=${MAKE_STREAMS_OUT:-$here}   # another folder, to try the script without touching the files
# QMP is driven by the qemu.qmp client of the project's virtual env (make venv).
python=${PYTHON:-$repo/.venv/bin/python}

q10=${QEMU_10:-}
if [ -z "$q10" ]; then
    out=$("$repo/tools/fetch-qemu.sh")
    [ -x "$out" ] && q10=$out || echo "make-streams: no QEMU 10.0: $out"
fi
q7=${QEMU_7:-$(command -v qemu-system-x86_64 || true)}

version_of() { [ -n "$1" ] && "$1" --version 2>/dev/null | sed -n '1s/^QEMU emulator version \([0-9]*\.[0-9]*\).*/\1/p'; }
[ "$(version_of "$q10")" = 10.0 ] || { [ -z "$q10" ] || echo "make-streams: $q10 is not QEMU 10.0"; q10=; }
[ "$(version_of "$q7")" = 7.2 ] || { [ -z "$q7" ] || echo "make-streams: $q7 is not QEMU 7.2"; q7=; }

tmp=$(mktemp -d /tmp/make-streams.XXXXXX)
pid=
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# save FILE QEMU MACHINE [QEMU ARGS...]: run the guest for 1 s, migrate it into FILE.
save() {
    local file=$1 qemu=$2 machine=$3
    shift 3
    if [ -z "$qemu" ]; then echo "make-streams: skipped $file (no such QEMU)"; return; fi
    local out=$tmp/$file sock=$tmp/qmp.sock uri
    case $("$qemu" --version | head -n1) in
        *"version 7."*) uri="exec:cat > $out" ;;
        *) uri="file:$out" ;;
    esac
    rm -f "$sock" "$out"
    "$qemu" -M "$machine" -accel tcg -m 16 -nodefaults -nographic -display none -S \
        "$@" -qmp "unix:$sock,server=on,wait=off" &
    pid=$!
    "$python" - "$sock" "$uri" >"$tmp/$file.qmp" <<'EOF'
import asyncio, json, os, sys
from qemu.qmp import QMPClient

async def main(sock: str, uri: str) -> int:
    while not os.path.exists(sock):
        await asyncio.sleep(0.01)
    qmp = QMPClient("make-streams")
    await qmp.connect(sock)

    async def run(command, arguments=None):
        reply = await qmp.execute(command, arguments)
        print(json.dumps({"execute": command, "arguments": arguments, "return": reply}), flush=True)
        return reply

    await run("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await run("cont")
    await asyncio.sleep(1)
    await run("query-status")
    await run("migrate", {"uri": uri})
    while (await run("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
        await asyncio.sleep(0.05)
    info = await qmp.execute("query-migrate")
    try:
        await qmp.execute("quit")
    except Exception:
        pass  # QEMU may close the socket before it answers
    await qmp.disconnect()
    return 0 if info["status"] == "completed" else 1

sys.exit(asyncio.run(main(*sys.argv[1:])))
EOF
    wait "$pid"
    pid=
    chmod 644 "$out"
    mv "$out" "$out_dir/$file"
    printf '%-32s %8d bytes  %s\n' "$file" "$(stat -c %s "$out_dir/$file")" "$("$qemu" --version | head -n1)"
}

# check FILE: what the README promises about each file, read from its bytes.
check() {
    [ -f "$out_dir/$1" ] || return 0
    "$python" - "$out_dir/$1" <<'EOF'
import struct, sys
path = sys.argv[1]
name = path.rsplit("/", 1)[1]
data = open(path, "rb").read()
assert data[:8] == b"QEVM\0\0\0\3", "bad header"
facts = []
facts.append("configuration" if data[8] == 0x07 else "no configuration")
sws = data.find(b"\x08\x00\x0b\x00\x00")
facts.append(f"SWITCHOVER_START at {sws}" if sws >= 0 else "no SWITCHOVER_START")
# The vmdesc is a trailing 0x06 + be32 length + JSON that runs to the end of the file.
tail = data.rfind(b"\x06")
vmdesc = False
while tail > 0:
    if tail + 5 <= len(data) and struct.unpack(">I", data[tail + 1:tail + 5])[0] == len(data) - tail - 5 \
            and data[tail + 5:tail + 6] == b"{":
        vmdesc = True
        break
    tail = data.rfind(b"\x06", 0, tail)
if vmdesc:
    facts.append(f"vmdesc of {len(data) - tail - 5} bytes at {tail}")
else:
    ok = data[-1] == 0 and data[-6] == 0x7E
    facts.append("no vmdesc, ends in footer + EOF" if ok else "no vmdesc, odd ending")
want_sws = "10.0-" in name
want_desc = "novmdesc" not in name
bad = (want_sws != (sws >= 0)) or (want_desc != vmdesc) or (want_desc != (data[8] == 0x07))
print(f"  {name}: {', '.join(facts)}" + ("  <-- unexpected" if bad else ""))
sys.exit(1 if bad else 0)
EOF
}

novmdesc=(-global migration.send-configuration=off)
all=(10.0-pc-16m-ran1s.bin 10.0-q35-16m-ran1s.bin 10.0-pc-16m-novmdesc.bin 7.2-pc-16m-novmdesc.bin)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${all[@]}")

for f in "${wanted[@]}"; do
    case $f in
        10.0-pc-16m-ran1s.bin) save "$f" "$q10" pc ;;
        10.0-q35-16m-ran1s.bin) save "$f" "$q10" q35 ;;
        10.0-pc-16m-novmdesc.bin) save "$f" "$q10" pc,suppress-vmdesc=on "${novmdesc[@]}" ;;
        7.2-pc-16m-novmdesc.bin) save "$f" "$q7" pc,suppress-vmdesc=on "${novmdesc[@]}" ;;
        *) echo "make-streams: unknown file $f (known: ${all[*]})" >&2; exit 2 ;;
    esac
done

echo "checks:"
status=0
for f in "${wanted[@]}"; do check "$f" || status=1; done
exit $status
