/*
 * Refusals through libfwnp: a code the library does not name and one it does, each with its
 * number and reason. Run by tests/denied.rs against a scripted agent socket; prints one line
 * per open for the test to check.
 */
#include <stdio.h>
#include <stdlib.h>

#include <fwnp.h>

static void open_once(fwnp_client *client, const fwnp_opening *opening) {
    fwnp_lease *lease = NULL;
    int rc = (int)fwnp_client_open(client, opening, &lease);
    const char *reason = fwnp_last_denial_reason();
    printf("rc %d code %llu reason %s error %s\n", rc,
           (unsigned long long)fwnp_last_denial_code(), reason ? reason : "(null)",
           fwnp_last_error());
    fwnp_lease_free(lease);
}

int main(int argc, char **argv) {
    if (argc != 2)
        return 2;
    fwnp_client *client = NULL;
    fwnp_opening *opening = NULL;
    if (fwnp_client_connect(NULL, &client) != FWNP_OK) {
        printf("failed connect: %s\n", fwnp_last_error());
        return 1;
    }
    uint16_t port = (uint16_t)atoi(argv[1]);
    if (fwnp_opening_ports(FWNP_TCP, port, port, &opening) != FWNP_OK) {
        printf("failed opening: %s\n", fwnp_last_error());
        return 1;
    }
    open_once(client, opening);
    open_once(client, opening);
    /* A call that succeeds clears the last refusal. */
    fwnp_client_set_timeout_ms(client, 5000);
    const char *reason = fwnp_last_denial_reason();
    printf("after %llu %s\n", (unsigned long long)fwnp_last_denial_code(),
           reason ? reason : "(null)");
    fflush(stdout);
    fwnp_opening_free(opening);
    fwnp_client_free(client);
    return 0;
}
