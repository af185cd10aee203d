# Sourced by the scripts in this folder: makes sure the system packages FWNP builds and tests
# with are present. As root it installs what is missing with apt-get; otherwise it names the
# missing packages and the command that installs them, and fails.

fwnp_missing_packages() {
  local missing=()
  command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
  command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
  command -v conntrack >/dev/null 2>&1 || [ -x /usr/sbin/conntrack ] || missing+=(conntrack)
  # libfwnp's tests: its C example is built with cc, linked through its pkg-config file and
  # run under Valgrind.
  command -v cc >/dev/null 2>&1 || missing+=(gcc)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
  # The agent links libacl: its socket's ACL lets exactly the configured users and groups in.
  pkg-config --exists libacl 2>/dev/null || missing+=(libacl1-dev)
  # The etcd store: protoc builds its client; the tests start etcd members and ask etcdctl.
  command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
  # etcd's protos import protobuf's well-known types, which protoc finds in libprotobuf-dev
  # (only recommended by protobuf-compiler, so not installed with it by --no-install-recommends).
  [ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
  # A real DNS server answering SRV queries for the agent's test of `srv = "_fwnp._udp.DOMAIN"`.
  command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
  # Real NAT-PMP and UPnP IGD clients for the agent's front-end tests.
  command -v natpmpc >/dev/null 2>&1 || missing+=(natpmpc)
  command -v upnpc >/dev/null 2>&1 || missing+=(miniupnpc)
  echo "${missing[@]}"
}

fwnp_ensure_packages() {
  export PATH="$PATH:/usr/sbin:/sbin"
  local missing
  missing=$(fwnp_missing_packages)
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fwnp: installing missing system packages: $missing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
    missing=$(fwnp_missing_packages)
    [ -z "$missing" ] && return 0
  fi
  echo "fwnp: missing system packages: $missing" >&2
  echo "fwnp: install them as root with: apt-get install $missing" >&2
  return 1
}

# The Python SDK's environment: a virtual environment in target/python-venv (Debian's Python
# refuses packages installed beside its own, PEP 668) holding the SDK of this tree, cbor2,
# pytest, and aioquic 1.x for the wire client written from the specification alone
# (interop-tests/python/wire_client.py, which sets stream limits aioquic 1.x keeps private).
# As root it installs python3 and python3-venv when missing; otherwise it names them.
# Exports FWNP_PYTHON, the environment's interpreter, which the tests use.
fwnp_python_env() {
  local venv=target/python-venv
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "fwnp: installing python3 and python3-venv for the Python SDK" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >&2
    else
      echo "fwnp: missing system packages: python3 python3-venv (the Python SDK's tests)" >&2
      echo "fwnp: install them as root with: apt-get install python3 python3-venv" >&2
      return 1
    fi
  fi
  if ! "$venv/bin/python" -c 'import cbor2, pytest, flit_core, aioquic' >/dev/null 2>&1; then
    echo "fwnp: making $venv with cbor2, pytest, flit_core and aioquic from PyPI" >&2
    python3 -m venv "$venv" || return 1
    "$venv/bin/pip" install -q --disable-pip-version-check 'cbor2>=6' pytest 'flit_core>=3.4,<4' 'aioquic>=1.2,<2' || {
      echo "fwnp: could not install cbor2, pytest, flit_core and aioquic into $venv (is PyPI reachable?)" >&2
      return 1
    }
  fi
  # The SDK of this tree, installed as `pip install ./sdk/python` does (without the network).
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
    --force-reinstall ./sdk/python >&2 || return 1
  FWNP_PYTHON="$(pwd)/$venv/bin/python"
  export FWNP_PYTHON
}
