# Sourced by the scripts in this folder: makes sure the system packages FWNP builds and tests
# with are present. As root it installs what is missing with apt-get; otherwise it names the
# missing packages and the command that installs them, and fails.

fwnp_missing_packages() {
  local missing=()
  command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
  command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
  command -v conntrack >/dev/null 2>&1 || [ -x /usr/sbin/conntrack ] || missing+=(conntrack)
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
