# shellcheck shell=bash
# shellcheck disable=SC2153  # ZBROKER_* come from devstack/settings
# zbroker's devstack plugin: `enable_plugin zbroker <repository>` on every
# node that runs Dragonflow (or zbroker), and `enable_service zbroker` on
# the controllers that run a broker. devstack sources this file with a mode
# and a phase (stack pre-install|install|post-config|extra, unstack, clean)
# after devstack/settings; README.md, "devstack", says what each phase does
# and lists the settings. scripts/test-devstack runs every phase with
# devstack's functions stubbed.

# Helpers
# -------

function _zbroker_tcp {
    echo "tcp://$1:$2"
}

# A TOML basic string.
function _zbroker_toml_str {
    local value=${1//\\/\\\\}
    value=${value//\"/\\\"}
    printf '"%s"' "$value"
}

# A TOML array of strings.
function _zbroker_toml_list {
    local out="[" item sep=""
    for item in "$@"; do
        out+="$sep$(_zbroker_toml_str "$item")"
        sep=", "
    done
    echo "$out]"
}

function _zbroker_join {
    local IFS=$1
    shift
    echo "$*"
}

# The brokers Dragonflow uses, one a line: this host's first when it runs
# one, then $ZBROKER_HOSTS, each once.
function _zbroker_hosts {
    local -a given
    local host seen=" "
    IFS=', ' read -r -a given <<< "$ZBROKER_HOSTS"
    if is_service_enabled zbroker; then
        given=("$ZBROKER_HOST_IP" "${given[@]}")
    fi
    for host in "${given[@]}"; do
        if [[ -n "$host" && "$seen" != *" $host "* ]]; then
            seen+="$host "
            echo "$host"
        fi
    done
}

function _zbroker_is_wildcard {
    [[ "$1" == "0.0.0.0" || "$1" == "*" ]]
}

# The files this plugin writes in $ZBROKER_CONF_DIR besides $ZBROKER_CONF.
function _zbroker_key_files {
    local name
    for name in broker.key broker.key.pub client.key client.key.pub publishers.keys subscribers.keys; do
        echo "$ZBROKER_CONF_DIR/$name"
    done
}

# Whether the broker is to join the etcd mesh (not with CURVE: the broker
# refuses clustering with it).
function _zbroker_clustered {
    [[ "$ZBROKER_CLUSTER_ETCD" == "True" && "$ZBROKER_CURVE" != "True" ]]
}

# Settings that cannot work, refused before anything is installed.
function zbroker_check_settings {
    if [[ "$ZBROKER_DRAGONFLOW" == "True" ]]; then
        local service
        for service in df-publisher-service df-zmq-publisher-service df-etcd-pubsub-service; do
            if is_service_enabled "$service"; then
                die $LINENO "zbroker replaces Dragonflow's pub/sub service: disable_service $service"
            fi
        done
        if [[ "$ZBROKER_CURVE" == "True" ]]; then
            die $LINENO "ZBROKER_CURVE=True with Dragonflow: zbroker_pubsub_driver has no CURVE options yet; set ZBROKER_CURVE=False"
        fi
    fi
    if is_service_enabled zbroker && [[ "$ZBROKER_BIND_HOST" == *:* ]]; then
        die $LINENO "ZBROKER_BIND_HOST=$ZBROKER_BIND_HOST: the broker binds IPv4 only (it does not set ZMQ_IPV6); give an IPv4 address"
    fi
    if is_service_enabled zbroker && _zbroker_clustered && ! is_service_enabled etcd3 \
            && [[ "$SERVICE_HOST" == "$HOST_IP" && "$ZBROKER_ETCD_URL" == "http://$SERVICE_HOST:${ETCD_PORT:-2379}" ]]; then
        die $LINENO "ZBROKER_CLUSTER_ETCD=True: enable_service etcd3 on this host (SERVICE_HOST), or give ZBROKER_ETCD_URL"
    fi
}

# Install
# -------

# Whether cargo $1 is of Rust $ZBROKER_MIN_RUST or later.
function _zbroker_cargo_recent {
    local version major minor want_major want_minor
    version=$("$1" --version 2>/dev/null) || return 1
    version=${version#cargo }
    version=${version%% *}
    IFS=. read -r major minor _ <<< "$version"
    IFS=. read -r want_major want_minor <<< "$ZBROKER_MIN_RUST"
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    (( major > want_major || (major == want_major && minor >= want_minor) ))
}

# Prints the cargo to build with: $ZBROKER_CARGO if set, else rustup's,
# else the one on PATH, whichever is recent enough.
function zbroker_find_cargo {
    local -a candidates
    local cargo
    if [[ -n "$ZBROKER_CARGO" ]]; then
        candidates=("$ZBROKER_CARGO")
    else
        candidates=("$HOME/.cargo/bin/cargo")
        if cargo=$(command -v cargo); then
            candidates+=("$cargo")
        fi
    fi
    for cargo in "${candidates[@]}"; do
        if [[ -x "$cargo" ]] && _zbroker_cargo_recent "$cargo"; then
            echo "$cargo"
            return 0
        fi
    done
    return 1
}

# Rust's own installer, for the stack user (~/.cargo), PATH left alone.
function zbroker_install_rust {
    echo "zbroker: installing Rust with rustup ($ZBROKER_RUSTUP_URL) into $HOME/.cargo"
    curl --proto '=https' --tlsv1.2 -sSf "$ZBROKER_RUSTUP_URL" \
        | sh -s -- -y --profile minimal --default-toolchain stable --no-modify-path
}

function zbroker_install_from_source {
    if is_ubuntu; then
        # The build compiles its own libzmq (with libsodium for CURVE) and
        # the etcd client's gRPC code (protoc).
        install_package g++ libsodium-dev pkg-config protobuf-compiler
    else
        warn $LINENO "zbroker: not Debian or Ubuntu: install g++, libsodium (static), pkg-config and protoc yourself"
    fi
    local cargo
    if ! cargo=$(zbroker_find_cargo); then
        if [[ "$ZBROKER_RUSTUP" != "True" ]]; then
            die $LINENO "zbroker needs cargo of Rust $ZBROKER_MIN_RUST or later (ZBROKER_CARGO, ~/.cargo/bin or PATH), or ZBROKER_RUSTUP=True, or ZBROKER_DEB"
        fi
        zbroker_install_rust
        cargo=$(zbroker_find_cargo) \
            || die $LINENO "rustup installed no cargo of Rust $ZBROKER_MIN_RUST or later"
    fi
    (cd "$ZBROKER_DIR" && "$cargo" build --release --locked --bin zbroker --target-dir "$ZBROKER_TARGET_DIR") \
        || die $LINENO "cargo build of $ZBROKER_DIR failed"
    sudo install -D -m 0755 "$ZBROKER_TARGET_DIR/release/zbroker" "$ZBROKER_BIN"
}

function zbroker_install_deb {
    is_ubuntu || die $LINENO "ZBROKER_DEB: a Debian package needs Debian or Ubuntu"
    local deb
    deb=$(readlink -f -- "$ZBROKER_DEB") || deb=""
    if [[ ! -f "$deb" ]]; then
        die $LINENO "ZBROKER_DEB=$ZBROKER_DEB: no such file"
    fi
    # An absolute path: apt takes it as a file, and installs what it depends on.
    apt_get install "$deb"
    # devstack runs the broker as devstack@zbroker; the package's own unit
    # would hold the same ports.
    sudo systemctl disable --now zbroker.service || true
    if [[ ! -x "$ZBROKER_BIN" ]]; then
        die $LINENO "$ZBROKER_DEB installed no $ZBROKER_BIN (set ZBROKER_BIN)"
    fi
}

function zbroker_install {
    if [[ -n "$ZBROKER_DEB" ]]; then
        zbroker_install_deb
    else
        zbroker_install_from_source
    fi
}

# The Python client and its Dragonflow driver, in devstack's Python
# environment. Not the [dragonflow] extra: Dragonflow is devstack's own.
function zbroker_install_client {
    pip_install "$ZBROKER_DIR/clients/python"
}

# Configure
# ---------

# A broker key pair and a client key pair (each only if missing: keygen
# never overwrites), and the key lists allowing the client every topic.
function zbroker_write_keys {
    local name list
    for name in broker client; do
        if [[ ! -f "$ZBROKER_CONF_DIR/$name.key" ]]; then
            "$ZBROKER_BIN" keygen "$ZBROKER_CONF_DIR/$name.key"
        fi
    done
    for list in publishers subscribers; do
        {
            echo "# Written by zbroker's devstack plugin: the client key may use every topic."
            echo "$(cat "$ZBROKER_CONF_DIR/client.key.pub") prefix:"
        } > "$ZBROKER_CONF_DIR/$list.keys"
    done
}

# Prints zbroker.toml.
function zbroker_config {
    local -a pub sub
    pub=("$(_zbroker_tcp "$ZBROKER_BIND_HOST" "$ZBROKER_PUB_PORT")" "ipc://$ZBROKER_IPC_SOCKET")
    sub=("$(_zbroker_tcp "$ZBROKER_BIND_HOST" "$ZBROKER_SUB_PORT")")
    echo "# Written by zbroker's devstack plugin (devstack/plugin.sh) on every stack.sh;"
    echo "# \`$ZBROKER_BIN run --config $ZBROKER_CONF --check-config\` prints every setting."
    echo "pub_bind = $(_zbroker_toml_list "${pub[@]}")"
    echo "sub_bind = $(_zbroker_toml_list "${sub[@]}")"
    if [[ -n "$ZBROKER_XPUB_PORT" && "$ZBROKER_CURVE" != "True" ]]; then
        echo "xpub_bind = $(_zbroker_toml_list "$(_zbroker_tcp "$ZBROKER_BIND_HOST" "$ZBROKER_XPUB_PORT")")"
    fi
    if [[ -n "$ZBROKER_METRICS_BIND" ]]; then
        echo "metrics_bind = $(_zbroker_toml_str "$ZBROKER_METRICS_BIND")"
    fi
    if [[ "$ZBROKER_CURVE" != "True" ]]; then
        echo "# Plaintext, open to whoever reaches $ZBROKER_BIND_HOST: the management network only."
        echo "insecure = true"
    fi
    if _zbroker_clustered; then
        echo
        echo "[cluster]"
        echo "bind = $(_zbroker_toml_str "$(_zbroker_tcp "$ZBROKER_BIND_HOST" "$ZBROKER_CLUSTER_PORT")")"
        if _zbroker_is_wildcard "$ZBROKER_BIND_HOST"; then
            echo "advertise = $(_zbroker_toml_str "$(_zbroker_tcp "$ZBROKER_HOST_IP" "$ZBROKER_CLUSTER_PORT")")"
        fi
        echo "etcd = $(_zbroker_toml_list "$ZBROKER_ETCD_URL")"
        echo "name = $(_zbroker_toml_str "$ZBROKER_CLUSTER_NAME")"
        echo "id = $(_zbroker_toml_str "$ZBROKER_CLUSTER_ID")"
    fi
    if [[ "$ZBROKER_CURVE" == "True" ]]; then
        echo
        echo "[curve]"
        echo "secret_key_file = $(_zbroker_toml_str "$ZBROKER_CONF_DIR/broker.key")"
        echo "publisher_keys = $(_zbroker_toml_str "$ZBROKER_CONF_DIR/publishers.keys")"
        echo "subscriber_keys = $(_zbroker_toml_str "$ZBROKER_CONF_DIR/subscribers.keys")"
    fi
}

function zbroker_configure {
    # The broker runs as the stack user (run_process), which owns these.
    sudo install -d -m 0755 -o "$STACK_USER" "$ZBROKER_CONF_DIR" "$(dirname "$ZBROKER_IPC_SOCKET")"
    if [[ "$ZBROKER_CURVE" == "True" ]]; then
        if [[ -n "$ZBROKER_XPUB_PORT" ]]; then
            warn $LINENO "zbroker: ZBROKER_CURVE=True: no XPUB front (ZBROKER_XPUB_PORT=$ZBROKER_XPUB_PORT left out): the broker refuses it with CURVE"
        fi
        if [[ "$ZBROKER_CLUSTER_ETCD" == "True" ]]; then
            warn $LINENO "zbroker: ZBROKER_CURVE=True: no cluster (ZBROKER_CLUSTER_ETCD left out): a CURVE cluster needs the public key of every controller in --cluster-peer-keys, which this node cannot know"
        fi
        zbroker_write_keys
    fi
    local tmp
    tmp=$(mktemp)
    zbroker_config > "$tmp"
    # Through install: a package's copy of the file belongs to root.
    sudo install -m 0644 -o "$STACK_USER" "$tmp" "$ZBROKER_CONF"
    rm -f "$tmp"
    "$ZBROKER_BIN" run --config "$ZBROKER_CONF" --check-config > /dev/null \
        || die $LINENO "zbroker refused $ZBROKER_CONF"
}

# Dragonflow's configuration: its pub/sub through zbroker_pubsub_driver.
function zbroker_configure_dragonflow {
    local conf=${DRAGONFLOW_CONF:-/etc/neutron/dragonflow.ini}
    local -a hosts pub=() sub=()
    local host
    mapfile -t hosts < <(_zbroker_hosts)
    if [[ ${#hosts[@]} -eq 0 ]]; then
        die $LINENO "zbroker: no broker for Dragonflow: set ZBROKER_HOSTS"
    fi
    if [[ ${#hosts[@]} -gt 1 && "$ZBROKER_CLUSTER_ETCD" != "True" ]]; then
        warn $LINENO "zbroker: brokers ${hosts[*]} without ZBROKER_CLUSTER_ETCD=True are independent: a subscriber on one misses what is published on another"
    fi
    for host in "${hosts[@]}"; do
        pub+=("$(_zbroker_tcp "$host" "$ZBROKER_PUB_PORT")")
        sub+=("$(_zbroker_tcp "$host" "$ZBROKER_SUB_PORT")")
    done
    iniset "$conf" df enable_df_pub_sub True
    iniset "$conf" df pub_sub_driver zbroker_pubsub_driver
    # Dragonflow 4.0.0 would publish through its multiproc driver instead
    # (master has no such option).
    iniset "$conf" df pub_sub_use_multiproc False
    # The addresses Dragonflow registers with the driver, tried after
    # [zbroker] subscriber_endpoints: the same brokers.
    iniset "$conf" df publishers_ips "$(_zbroker_join , "${hosts[@]}")"
    iniset "$conf" df publisher_transport tcp
    iniset "$conf" df publisher_port "$ZBROKER_SUB_PORT"
    # Dragonflow's own zmq drivers PUSH there: the broker binds it.
    iniset "$conf" df_zmq ipc_socket "$ZBROKER_IPC_SOCKET"
    iniset "$conf" zbroker publisher_endpoints "$(_zbroker_join , "${pub[@]}")"
    iniset "$conf" zbroker subscriber_endpoints "$(_zbroker_join , "${sub[@]}")"
}

if [[ "$ZBROKER_DRAGONFLOW" == "True" ]]; then
    # Dragonflow's plugin (2.0.0 to master) calls this in its post-config
    # phase when DF_PUB_SUB is True (devstack/settings makes it so), after
    # it has written dragonflow.ini afresh and before it starts
    # df-controller, whichever of the two plugins devstack runs first: this
    # file has been sourced since pre-install.
    function configure_pubsub_service_plugin {
        zbroker_configure_dragonflow
    }
fi

# Start, stop, clean
# ------------------

function zbroker_start {
    # A socket left by an earlier broker would pass for this one's.
    rm -f "$ZBROKER_IPC_SOCKET"
    run_process zbroker "$ZBROKER_BIN run --config $ZBROKER_CONF${ZBROKER_RUN_ARGS:+ $ZBROKER_RUN_ARGS}"
    # neutron-server starts right after this phase, and a publisher with
    # several brokers and none up waits up to 5 s per update, then drops
    # it: wait for the broker's endpoints (bound together at start).
    local deadline=$((SECONDS + ${ZBROKER_START_TIMEOUT:-30}))
    while [[ ! -S "$ZBROKER_IPC_SOCKET" ]]; do
        if (( SECONDS >= deadline )); then
            die $LINENO "zbroker did not bind $ZBROKER_IPC_SOCKET within ${ZBROKER_START_TIMEOUT:-30} s: journalctl -u devstack@zbroker"
        fi
        sleep 0.2
    done
}

function zbroker_stop {
    stop_process zbroker
}

function zbroker_clean {
    local file
    sudo rm -f "$ZBROKER_IPC_SOCKET" "$ZBROKER_CONF"
    while read -r file; do
        sudo rm -f "$file"
    done < <(_zbroker_key_files)
    local dir
    for dir in "$ZBROKER_CONF_DIR" "$(dirname "$ZBROKER_IPC_SOCKET")"; do
        if [[ -d "$dir" ]]; then
            # Others' files (Dragonflow's, a package's) stay, and so does
            # their directory.
            sudo rmdir --ignore-fail-on-non-empty "$dir"
        fi
    done
    if [[ -z "$ZBROKER_DEB" ]]; then
        sudo rm -f "$ZBROKER_BIN"
    fi
}

# Dispatch
# --------

if [[ "${1:-}" == "stack" ]]; then
    zbroker_check_settings
    case "${2:-}" in
        install)
            if is_service_enabled zbroker; then
                echo_summary "Installing zbroker"
                zbroker_install
            fi
            if [[ "$ZBROKER_DRAGONFLOW" == "True" ]]; then
                echo_summary "Installing zbroker's Python client for Dragonflow"
                zbroker_install_client
            fi
            ;;
        post-config)
            # The broker starts here rather than in extra: neutron-server
            # and Dragonflow's controllers start before extra.
            if is_service_enabled zbroker; then
                echo_summary "Configuring and starting zbroker"
                zbroker_configure
                zbroker_start
            fi
            ;;
    esac
elif [[ "${1:-}" == "unstack" ]]; then
    if is_service_enabled zbroker; then
        zbroker_stop
    fi
elif [[ "${1:-}" == "clean" ]]; then
    if is_service_enabled zbroker; then
        zbroker_clean
    fi
fi
