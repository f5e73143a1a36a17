/* The launch floor: the smallest program posix_spawn can start, linked
 * statically (no dynamic loader), that writes one byte to stdout and waits
 * for end of file on stdin. compare.rs times spawn to that byte. */
#include <unistd.h>

int main(void) {
    char byte = 'x';
    if (write(1, &byte, 1) != 1)
        return 1;
    while (read(0, &byte, 1) > 0) {
    }
    return 0;
}
