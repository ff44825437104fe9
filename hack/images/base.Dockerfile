# The base image made on this machine, for machines that reach no container registry:
# a debootstrap (minbase) of Debian with Debian's Python 3 (hack/build-images.sh).
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
