/*
 * Lease events through libfwnp, both ways: by polling the lease's descriptor, then by a
 * callback. Run by tests/events.rs against a scripted agent socket, which pushes the events;
 * this program prints what it saw, one fact a line, for the test to check.
 */
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <fwnp.h>

static fwnp_lease *lease;
static atomic_int revoked;
static atomic_int release_in_callback = 1;
static char reopened_id[FWNP_LEASE_ID_SIZE];
static char revoked_reason[256];

/* Runs on the library's thread. */
static void on_event(void *user_data, const fwnp_event *event) {
    int *count = user_data;
    (*count)++;
    switch (fwnp_event_get_kind(event)) {
    case FWNP_EVENT_REOPENED:
        fwnp_event_get_new_lease_id(event, reopened_id, sizeof reopened_id);
        /* Blocking from the callback is refused, not a deadlock. */
        atomic_store(&release_in_callback, fwnp_lease_release(lease));
        break;
    case FWNP_EVENT_REVOKED: {
        const char *reason = fwnp_event_get_reason(event);
        snprintf(revoked_reason, sizeof revoked_reason, "%s", reason ? reason : "(none)");
        atomic_store(&revoked, 1);
        break;
    }
    default:
        break;
    }
}

static int fail(const char *what) {
    printf("failed %s: %s\n", what, fwnp_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2)
        return 2;
    fwnp_client *client = NULL;
    fwnp_opening *opening = NULL;
    if (fwnp_client_connect(NULL, &client) != FWNP_OK)
        return fail("connect");
    if (fwnp_opening_ports(FWNP_TCP, (uint16_t)atoi(argv[1]), (uint16_t)atoi(argv[1]),
                           &opening) != FWNP_OK)
        return fail("opening");
    if (fwnp_client_open(client, opening, &lease) != FWNP_OK)
        return fail("open");
    char id[FWNP_LEASE_ID_SIZE];
    fwnp_lease_id(lease, id, sizeof id);
    printf("open %s\n", id);

    int fd = -1;
    fwnp_lease_event_fd(lease, &fd);
    struct pollfd p = {.fd = fd, .events = POLLIN};
    printf("poll %d\n", poll(&p, 1, 10000));
    fwnp_event *event = NULL;
    if (fwnp_lease_next_event(lease, &event) != FWNP_OK)
        return fail("next event");
    printf("polled %d %llu\n", (int)fwnp_event_get_kind(event),
           (unsigned long long)fwnp_event_get_expires_in_ms(event));
    fwnp_event_free(event);
    printf("then %d\n", (int)fwnp_lease_next_event(lease, &event));
    printf("readable %d\n", poll(&p, 1, 0));

    int count = 0;
    fwnp_lease_set_callback(lease, on_event, &count);
    printf("callback set\n");
    fflush(stdout);
    for (int i = 0; i < 1000 && !atomic_load(&revoked); i++)
        usleep(10000);
    printf("callback reopened %s release-in-callback %d\n", reopened_id,
           atomic_load(&release_in_callback));
    printf("callback revoked: %s (%d events)\n", revoked_reason, count);
    fwnp_lease_id(lease, id, sizeof id);
    printf("id now %s\n", id);
    int active = -1;
    fwnp_lease_is_active(lease, &active);
    printf("active %d\n", active);
    printf("released %d\n", (int)fwnp_lease_release(lease));
    fflush(stdout);
    fwnp_lease_free(lease);
    fwnp_opening_free(opening);
    fwnp_client_free(client);
    return 0;
}
