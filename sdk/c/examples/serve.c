/*
 * serve.c: a TCP server that holds its port open in the host's firewall only while it serves.
 *
 *   cc serve.c $(pkg-config --cflags --libs fwnp) -o serve
 *   ./serve 8080            (FWNP_AGENT_SOCKET names the agent's socket if not the default)
 *
 * It binds the port first (the agent checks that the port is this process's), asks the host
 * agent for an opening of it, serves one connection (it answers the first line it reads with
 * "hello from serve.c: " and that line), releases the opening, and then waits for its
 * standard input to close before it stops listening, so that one can see the firewall closed
 * while the server still listens. Lease events (renewed, revoked...) are watched by polling
 * the lease's event descriptor beside the listening socket.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fwnp.h>

static int fail(const char *what) {
    fprintf(stderr, "serve: %s: %s\n", what, fwnp_last_error());
    return 1;
}

/* Prints the events waiting on the lease; returns 1 when one of them ended it. */
static int drain_events(fwnp_lease *lease) {
    int ended = 0;
    fwnp_event *event = NULL;
    while (fwnp_lease_next_event(lease, &event) == FWNP_OK) {
        fwnp_event_kind kind = fwnp_event_get_kind(event);
        const char *reason = fwnp_event_get_reason(event);
        printf("event %d%s%s\n", (int)kind, reason ? ": " : "", reason ? reason : "");
        if (kind != FWNP_EVENT_RENEWED && kind != FWNP_EVENT_REOPENED &&
            kind != FWNP_EVENT_GATEWAY_UNREACHABLE && kind != FWNP_EVENT_RENEWAL_REFUSED)
            ended = 1;
        fwnp_event_free(event);
    }
    fflush(stdout);
    return ended;
}

/* Reads one line from the connection and answers it. */
static int serve_one(int conn) {
    char line[512];
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t n = read(conn, line + got, 1);
        if (n <= 0 || line[got] == '\n')
            break;
        got += (size_t)n;
    }
    line[got] = '\0';
    char answer[600];
    int len = snprintf(answer, sizeof answer, "hello from serve.c: %s\n", line);
    return write(conn, answer, (size_t)len) == len ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 2 || atoi(argv[1]) <= 0 || atoi(argv[1]) > 65535) {
        fprintf(stderr, "usage: serve PORT\n");
        return 2;
    }
    uint16_t port = (uint16_t)atoi(argv[1]);

    /* Bind first: the agent opens only a port the asking process holds. */
    int listener = socket(AF_INET6, SOCK_STREAM, 0);
    int no = 0, yes = 1;
    setsockopt(listener, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof no);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    struct sockaddr_in6 addr = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(listener, 8) != 0) {
        perror("serve: listen");
        return 1;
    }

    fwnp_client *client = NULL;
    fwnp_opening *opening = NULL;
    fwnp_lease *lease = NULL;
    int status = 1;
    if (fwnp_client_connect(NULL, &client) != FWNP_OK) {
        status = fail("connecting to the host agent");
        goto out;
    }
    if (fwnp_opening_ports(FWNP_TCP, port, port, &opening) != FWNP_OK ||
        fwnp_opening_set_lifetime(opening, 60) != FWNP_OK ||
        fwnp_opening_set_name(opening, "serve.c") != FWNP_OK) {
        status = fail("building the opening");
        goto out;
    }
    fwnp_code rc = fwnp_client_open(client, opening, &lease);
    if (rc != FWNP_OK) {
        fprintf(stderr, "serve: not opened (code %d): %s\n", (int)rc, fwnp_last_error());
        goto out;
    }
    char id[FWNP_LEASE_ID_SIZE];
    if (fwnp_lease_id(lease, id, sizeof id) != FWNP_OK) {
        status = fail("lease id");
        goto out;
    }
    printf("open %s\n", id);
    fflush(stdout);

    int events_fd = -1;
    if (fwnp_lease_event_fd(lease, &events_fd) != FWNP_OK) {
        status = fail("event descriptor");
        goto out;
    }
    /* Wait for a connection (at most a minute), watching the lease meanwhile. */
    int conn = -1;
    for (int waited = 0; conn < 0 && waited < 60; waited++) {
        struct pollfd fds[2] = {{.fd = listener, .events = POLLIN},
                                {.fd = events_fd, .events = POLLIN}};
        if (poll(fds, 2, 1000) < 0 && errno != EINTR)
            break;
        if ((fds[1].revents & POLLIN) && drain_events(lease)) {
            fprintf(stderr, "serve: the lease ended before a connection came\n");
            goto out;
        }
        if (fds[0].revents & POLLIN)
            conn = accept(listener, NULL, NULL);
    }
    if (conn < 0) {
        fprintf(stderr, "serve: no connection came\n");
        goto out;
    }
    int served = serve_one(conn);
    close(conn);
    printf(served == 0 ? "served\n" : "serving failed\n");
    fflush(stdout);

    if (fwnp_lease_release(lease) != FWNP_OK) {
        status = fail("releasing");
        goto out;
    }
    printf("released\n");
    fflush(stdout);
    /* Still listening, with the firewall closed again, until standard input closes. */
    char sink[64];
    while (read(STDIN_FILENO, sink, sizeof sink) > 0) {
    }
    status = served == 0 ? 0 : 1;

out:
    fwnp_lease_free(lease);
    fwnp_opening_free(opening);
    fwnp_client_free(client);
    close(listener);
    return status;
}
