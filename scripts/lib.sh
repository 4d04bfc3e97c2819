# Shell helpers shared by the scripts; sourced, never run:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Ports:      listening PORT; port_used PORT; first_free COUNT BASE...;
#             wait_for_port PORT [SECONDS]
# Waiting:    wait_for_url URL [SECONDS [PID]]
# Leftovers:  drop_databases PREFIX; delete_vhost NAME
# A throwaway system (`order-system run --throwaway`):
#             throwaway_start BIN NAME LOG [ARGS...]; throwaway_stop
#             (an older build without it is started by environment instead)
#
# Settings (environment): POSTGRES_HOST (127.0.0.1), POSTGRES_USER
# (postgres), RABBITMQ_API_URL (http://guest:guest@127.0.0.1:15672/api).

LIB_PG_HOST=${POSTGRES_HOST:-127.0.0.1}
LIB_PG_USER=${POSTGRES_USER:-postgres}
LIB_RABBITMQ_API=${RABBITMQ_API_URL:-http://guest:guest@127.0.0.1:15672/api}

# Whether something accepts connections on 127.0.0.1:PORT.
listening() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Whether any socket (listening or connected, TIME-WAIT aside) uses local PORT.
port_used() {
    ss -Htan "( sport = :$1 )" | grep -qv '^TIME-WAIT'
}

# The first BASE among the candidates with COUNT free ports from it.
first_free() { # count, candidates...
    local n=$1 base i
    shift
    for base in "$@"; do
        for ((i = 0; i < n; i++)); do port_used $((base + i)) && continue 2; done
        echo "$base"
        return 0
    done
    echo "no $n free ports from any of $*" >&2
    return 1
}

# Waits until something listens on 127.0.0.1:PORT (default: 60 s).
wait_for_port() { # port [seconds]
    local port=$1 limit=${2:-60} t0=$SECONDS
    while ((SECONDS - t0 < limit)); do
        listening "$port" && return 0
        sleep 0.2
    done
    echo "nothing listens on 127.0.0.1:$port after $limit s" >&2
    return 1
}

# Waits until URL answers 2xx (default: 120 s); fails at once when PID ends.
wait_for_url() { # url [seconds [pid]]
    local url=$1 limit=${2:-120} pid=${3:-} t0=$SECONDS
    while ((SECONDS - t0 < limit)); do
        curl -sf -o /dev/null "$url" && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "process $pid ended before $url answered" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "$url did not answer within $limit s" >&2
    return 1
}

# Drops every database whose name starts with PREFIX (a system's leftovers).
drop_databases() { # prefix
    local prefix=$1 db
    [ -n "$prefix" ] || { echo "drop_databases: an empty prefix would name every database" >&2; return 1; }
    for db in $(psql -X -q -h "$LIB_PG_HOST" -U "$LIB_PG_USER" -d postgres -At \
        -c "SELECT datname FROM pg_database WHERE starts_with(datname, '$prefix')"); do
        psql -X -q -h "$LIB_PG_HOST" -U "$LIB_PG_USER" -d postgres \
            -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
    done
}

# Deletes RabbitMQ vhost NAME (nothing when there is none).
delete_vhost() { # name
    curl -s -o /dev/null -X DELETE "$LIB_RABBITMQ_API/vhosts/$1"
}

# Starts BIN (an order-system binary) as a throwaway system named NAME (its
# databases NAME_*, its vhost NAME), its output in LOG, ARGS passed on to
# `run --throwaway` (e.g. --shared-vhost). Waits until its gateway is ready,
# then sets THROWAWAY_PID and, from its env file, GATEWAY_URL, GATEWAY_PORT,
# IDENTITY_URL, ..., DATABASE_PREFIX, AMQP_VHOST, MAIL_DIR. Settings of the
# system come from the environment as usual (RUST_LOG, THROTTLES=on, ...).
# Callers run throwaway_stop on exit (a trap): it stops the system, which
# removes its databases and vhost, and removes whatever it could not.
throwaway_start() { # bin name log [args...]
    local bin=$1 log=$3
    THROWAWAY_NAME=$2
    shift 3
    THROWAWAY_OWN_VHOST=1
    case " $* " in *" --shared-vhost "*) THROWAWAY_OWN_VHOST="" ;; esac
    THROWAWAY_ENV=$(mktemp -u "/tmp/throwaway-$THROWAWAY_NAME.XXXXXX.env")
    if "$bin" run --help 2>/dev/null | grep -q -- --throwaway; then
        "$bin" run --throwaway --name "$THROWAWAY_NAME" --env-file "$THROWAWAY_ENV" "$@" >"$log" 2>&1 &
        THROWAWAY_PID=$!
    else
        throwaway_start_by_env "$bin" "$log" || return 1
    fi
    local t0=$SECONDS
    until [ -e "$THROWAWAY_ENV" ]; do
        if ! kill -0 "$THROWAWAY_PID" 2>/dev/null || ((SECONDS - t0 > 120)); then
            echo "the throwaway system $THROWAWAY_NAME did not start:" >&2
            grep -v '^ *[0-9]*: \|^ *at ' "$log" | tail -n 20 >&2
            return 1
        fi
        sleep 0.2
    done
    # shellcheck disable=SC1090
    . "$THROWAWAY_ENV"
    if ! wait_for_url "$GATEWAY_URL/health/ready" 120 "$THROWAWAY_PID"; then
        grep -v '^ *[0-9]*: \|^ *at ' "$log" | tail -n 20 >&2
        return 1
    fi
}

# A build from before `run --throwaway` (an A/B benchmark's older side),
# started as that build's own scripts started it: by environment, its
# services on the gateway's port + 1..5, throttles off, and the same env
# file written here. Its databases and vhost are removed by throwaway_stop.
throwaway_start_by_env() { # bin log
    local bin=$1 log=$2 port
    [ -n "$THROWAWAY_OWN_VHOST" ] || { echo "--shared-vhost needs a build with run --throwaway" >&2; return 1; }
    port=$(first_free 6 24080 24180 24280 24380 24480) || return 1
    curl -sf -o /dev/null -X PUT "$LIB_RABBITMQ_API/vhosts/$THROWAWAY_NAME" || return 1
    curl -sf -o /dev/null -X PUT -H 'content-type: application/json' -d '{"configure":".*","write":".*","read":".*"}' \
        "$LIB_RABBITMQ_API/permissions/$THROWAWAY_NAME/guest" || return 1
    mkdir -p "/tmp/order-system-$THROWAWAY_NAME"
    POSTGRES_URL="postgres://$LIB_PG_USER@$LIB_PG_HOST:5432" DATABASE_PREFIX="${THROWAWAY_NAME}_" \
        AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$THROWAWAY_NAME" \
        GATEWAY_ADDR="127.0.0.1:$port" GATEWAY_HTTPS_ADDR= PUSH_TLS_ADDR= \
        MAIL_DIR="/tmp/order-system-$THROWAWAY_NAME/mail" \
        LOGIN_PER_ADDRESS_PER_MINUTE=0 LOGIN_PER_ACCOUNT_PER_MINUTE=0 REGISTER_PER_ADDRESS_PER_MINUTE=0 \
        ORDERS_PER_USER_PER_MINUTE=0 DEPOSITS_PER_USER_PER_MINUTE=0 WITHDRAWALS_PER_USER_PER_MINUTE=0 \
        EMAILS_PER_RECIPIENT_PER_HOUR=0 \
        "$bin" >"$log" 2>&1 &
    THROWAWAY_PID=$!
    printf 'GATEWAY_URL=http://127.0.0.1:%s\nGATEWAY_PORT=%s\nDATABASE_PREFIX=%s_\nAMQP_VHOST=%s\nMAIL_DIR=%s\nSYSTEM_PID=%s\n' \
        "$port" "$port" "$THROWAWAY_NAME" "$THROWAWAY_NAME" "/tmp/order-system-$THROWAWAY_NAME/mail" "$THROWAWAY_PID" >"$THROWAWAY_ENV"
}

# Stops the throwaway system (SIGTERM; SIGKILL after 30 s) and removes what
# it left: its databases and vhost are normally gone already.
throwaway_stop() {
    [ -n "${THROWAWAY_NAME:-}" ] || return 0
    # Also under `set -e` (an EXIT trap): nothing here may end the caller.
    if [ -n "${THROWAWAY_PID:-}" ]; then
        kill -TERM "$THROWAWAY_PID" 2>/dev/null || true
        local _i
        for _i in $(seq 1 60); do kill -0 "$THROWAWAY_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$THROWAWAY_PID" 2>/dev/null || true
        wait "$THROWAWAY_PID" 2>/dev/null || true
    fi
    drop_databases "${THROWAWAY_NAME}_" 2>/dev/null || true
    [ -z "${THROWAWAY_OWN_VHOST:-}" ] || delete_vhost "$THROWAWAY_NAME" || true
    rm -f "${THROWAWAY_ENV:-}"
    rm -rf "/tmp/order-system-$THROWAWAY_NAME"
    THROWAWAY_NAME="" THROWAWAY_PID=""
    return 0
}
