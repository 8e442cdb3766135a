// placeholder: the HTTP/1.1 codec tests are being written
