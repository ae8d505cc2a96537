"""Optional notifications: the summary mail the runner sends after each task and at the end of a suite."""

from vltune.notify.mail import MailQueue, MailSettings, build_message, send_mail, summary_body, summary_subject

__all__ = ["MailQueue", "MailSettings", "build_message", "send_mail", "summary_body", "summary_subject"]
